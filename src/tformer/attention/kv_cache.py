"""Caches for incremental decoding, under two protocols.

`DecodingCache` is what a decoding loop needs from any model's cache, whatever the model keeps in it:
`length`, `index_select`, `reorder_`, `clone`. Six types follow it: a layer's `KV` and `KVCache` (here),
`DecoderCache` (models/decoder.py), `LMCache` (models/lm.py), `RNNDecoderCache` and `RNNLMCache`
(models/rnn.py). `LayerKV` is what an attention layer reads back: `KV` (keys and values as tensors, grown
by concatenation) and `KVCache` (preallocated buffers written in place).

Rows of one batch may hold different numbers of positions (continuous batching: requests join and
leave a running batch between steps). A `KVCache` whose rows differ carries `lengths` (B,), each row's
filled slots, with `length` their maximum (the width its keys are read at); a step writes row b's T new
positions at slots lengths[b] .. lengths[b] + T - 1, so a position is its slot, and attention masks
each query to the slots at or before its own position (`positions_mask`, attention/masks.py). Every slot
below `length` holds a written value (a row's own, or what it wrote before it was cut back: the padding of
a prompt) or zero, never uninitialised memory, so a masked key times its weight 0 stays 0; slots from
`length` on are not read before they are written (a step that widens the view zeroes its new columns
first), so buffers are allocated empty and rows joining or leaving copy only the `length` slots read. While
every row has the same length the cache is exactly the uniform one: `lengths` is None and a step is one
slice write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

C = TypeVar("C", bound="DecodingCache")


class DecodingCache(Protocol):
    """A model's cache as decoding loops use it (greedy, beam search, sampling, the server): how many
    positions it holds, a copy with some batch rows (one source repeated for its beams), an in-place
    reorder of rows (beams moving), and an independent copy (a cache is written in place, so branching
    needs one)."""

    @property
    def length(self) -> int: ...

    def index_select(self: C, index: Tensor) -> C: ...

    def reorder_(self, index: Tensor) -> None: ...

    def clone(self: C) -> C: ...


class LayerKV(Protocol):
    """One layer's cached keys and values: (B, H, S, D) views of what has been written, the filled length
    S, and a copy keeping / reordering batch rows (beam search)."""

    @property
    def k(self) -> Tensor: ...

    @property
    def v(self) -> Tensor: ...

    @property
    def length(self) -> int: ...

    def index_select(self, index: Tensor) -> LayerKV: ...


class KV(NamedTuple):
    """Projected keys and values of one attention layer, (B, H, S, D) each. Keys are stored as the kernel
    consumes them: after rotary positions and the score's key transform (attention/scores.py; unit keys for
    "cosine", (B, H, S, D + 1) augmented keys for "l2")."""

    k: Tensor
    v: Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def index_select(self, index: Tensor) -> KV:
        """Keep / reorder batch rows (beam search): index (B',) -> KV with batch B'."""
        return KV(self.k.index_select(0, index), self.v.index_select(0, index))

    def reorder_(self, index: Tensor) -> None:
        """Reorder batch rows in place (same batch size), writing into the tensors themselves."""
        self.k.copy_(self.k.index_select(0, index))
        self.v.copy_(self.v.index_select(0, index))

    def clone(self) -> KV:
        return KV(self.k.clone(), self.v.clone())


class KVCache:
    """A static (preallocated) self-attention cache of one layer: key and value buffers
    (B, H_kv, capacity, D), of which the first `length` positions are filled (`lengths[b]` of row b when
    rows differ).

    Decoding writes each step's keys/values into the buffers in place (`append`) instead of concatenating
    a new tensor per token, so a step costs no allocation or copy of the past. The buffers are allocated on
    the first write, with that step's batch size, heads, dtype and device (so autocast or a bfloat16 model
    gets a cache of its own dtype), and never again: their storage stays the same for the whole decode.
    Because it is written in place, a cache belongs to one decoding sequence: feeding it twice from the
    same state needs a `clone()`.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self.lengths: Tensor | None = None  # (B,) per-row filled slots when rows differ, else None
        self.k_buf: Tensor | None = None  # (B, H_kv, capacity, D)
        self.v_buf: Tensor | None = None

    @property
    def k(self) -> Tensor:
        """The filled keys (B, H_kv, length, D), a view of the buffer."""
        if self.k_buf is None:
            raise ValueError("the KV cache is empty (nothing was written to it yet)")
        return self.k_buf[:, :, : self.length]

    @property
    def v(self) -> Tensor:
        if self.v_buf is None:
            raise ValueError("the KV cache is empty (nothing was written to it yet)")
        return self.v_buf[:, :, : self.length]

    def positions(self, t: int) -> Tensor | None:
        """The positions (B, T) of the next T tokens of each row when rows differ, else None (every row's
        next positions are length .. length + T - 1)."""
        if self.lengths is None:
            return None
        return self.lengths[:, None] + torch.arange(t, device=self.lengths.device)

    def append(self, k: Tensor, v: Tensor) -> KV:
        """Write T new positions (B, H_kv, T, D) after the filled ones (each row after its own when rows
        differ); -> views of the first `length` slots."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {t} new positions > capacity {self.capacity}"
            )
        if self.k_buf is None or self.v_buf is None:
            # keys may be wider than values (the l2 score appends a feature to each key)
            b, h, _, dk = k.shape
            self.k_buf = k.new_empty(b, h, self.capacity, dk)
            self.v_buf = v.new_empty(b, h, self.capacity, v.shape[3])
        elif k.shape[:2] != self.k_buf.shape[:2] or k.shape[3] != self.k_buf.shape[3]:
            raise ValueError(
                f"keys of shape {tuple(k.shape)} do not fit a KV cache of shape {tuple(self.k_buf.shape)}"
            )
        if self.lengths is None:
            self.k_buf[:, :, self.length : end] = k
            self.v_buf[:, :, self.length : end] = v
        else:  # row b's T positions at its own slots: advanced indices (B, T) around the head slice
            self.k_buf[:, :, self.length : end].zero_()  # the new columns, for rows that do not reach them
            self.v_buf[:, :, self.length : end].zero_()
            slots = self.lengths[:, None] + torch.arange(t, device=k.device)  # (B, T)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k_buf[rows, :, slots] = k.transpose(1, 2)  # (B, T, H_kv, D)
            self.v_buf[rows, :, slots] = v.transpose(1, 2)
            self.lengths = self.lengths + t
        self.length = end
        return KV(self.k_buf[:, :, :end], self.v_buf[:, :, :end])

    def set_lengths(self, lengths: Tensor | None, length: int) -> None:
        """Set the rows' filled slots: `lengths` (B,) per row (None: every row `length`), `length` their
        maximum. Used by the model-level caches (LMCache, DecoderCache) after a step, e.g. to cut a padded
        prompt back to each row's real length."""
        self.lengths, self.length = lengths, length

    def reorder_(self, index: Tensor) -> None:
        """Reorder batch rows in place (beam search moves beams): index (B,) of rows of this cache."""
        if self.k_buf is None or self.v_buf is None or self.length == 0:
            return
        if index.shape[0] != self.k_buf.shape[0]:
            raise ValueError(
                f"in-place reorder keeps the batch size {self.k_buf.shape[0]}; got {index.shape[0]} rows "
                "(use index_select to change it)"
            )
        n = self.length
        self.k_buf[:, :, :n] = self.k_buf[:, :, :n].index_select(0, index)
        self.v_buf[:, :, :n] = self.v_buf[:, :, :n].index_select(0, index)
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, index)

    def _with(self, k_buf: Tensor | None, v_buf: Tensor | None, lengths: Tensor | None) -> KVCache:
        new = KVCache(self.capacity)
        new.length, new.lengths, new.k_buf, new.v_buf = self.length, lengths, k_buf, v_buf
        return new

    def _filled(self, buf: Tensor, index: Tensor | None) -> Tensor:
        """A buffer of this capacity holding the first `length` slots of rows `index` (None: all) of `buf`:
        only the slots read are copied."""
        src = buf[:, :, : self.length] if index is None else buf[:, :, : self.length].index_select(0, index)
        out = buf.new_empty(src.shape[0], buf.shape[1], self.capacity, buf.shape[3])
        out[:, :, : self.length] = src
        return out

    def index_select(self, index: Tensor) -> KVCache:
        """A new cache holding batch rows `index` (B',) of this one (any B'), same capacity."""
        if self.k_buf is None or self.v_buf is None:
            return self._with(None, None, None)
        lengths = None if self.lengths is None else self.lengths.index_select(0, index)
        return self._with(self._filled(self.k_buf, index), self._filled(self.v_buf, index), lengths)

    def clone(self) -> KVCache:
        if self.k_buf is None or self.v_buf is None:
            return self._with(None, None, None)
        lengths = None if self.lengths is None else self.lengths.clone()
        return self._with(self._filled(self.k_buf, None), self._filled(self.v_buf, None), lengths)

    @staticmethod
    def cat(caches: Sequence[KVCache]) -> KVCache:
        """One cache holding the rows of `caches` in order (each written to, same capacity, heads and
        dtype): a running batch and the requests that join it. Rows keep their own lengths; each cache's
        filled slots are copied, and zeros fill the slots up to the longest."""
        if not caches:
            raise ValueError("KVCache.cat needs at least one cache")
        capacity = caches[0].capacity
        bufs = []
        for c in caches:
            if c.capacity != capacity:
                raise ValueError(f"KVCache.cat: capacities differ ({capacity} and {c.capacity})")
            if c.k_buf is None or c.v_buf is None:
                raise ValueError("KVCache.cat: a cache is empty (nothing was written to it yet)")
            bufs.append((c, c.k_buf, c.v_buf))
        width = max(c.length for c in caches)
        k0, v0 = bufs[0][1], bufs[0][2]
        b = sum(k.shape[0] for _, k, _ in bufs)
        new = KVCache(capacity)
        new.k_buf = k_buf = k0.new_empty(b, k0.shape[1], capacity, k0.shape[3])
        new.v_buf = v_buf = v0.new_empty(b, v0.shape[1], capacity, v0.shape[3])
        lengths, row = [], 0
        for c, k, v in bufs:
            rows = slice(row, row + k.shape[0])
            k_buf[rows, :, : c.length], v_buf[rows, :, : c.length] = k[:, :, : c.length], v[:, :, : c.length]
            k_buf[rows, :, c.length : width].zero_()
            v_buf[rows, :, c.length : width].zero_()
            lengths.append(
                c.lengths if c.lengths is not None else torch.full((k.shape[0],), c.length, device=k.device)
            )
            row += k.shape[0]
        new.lengths, new.length = torch.cat(lengths), width
        return new

    def clear(self) -> None:
        """Forget the cached positions (the buffers stay allocated)."""
        self.length, self.lengths = 0, None


class RowLengths:
    """Each batch row's filled positions, kept on the host, for a model-level cache over several layers'
    `KVCache`s (LMCache; DecoderCache's self-attention): set once after a step and pushed to every layer
    (None while all rows agree, so the uniform cache's slice writes and causal kernels stay in use)."""

    @staticmethod
    def of(kvs: Sequence[KVCache], batch: int) -> list[int]:
        """The per-row lengths of a stack of layer caches with `batch` rows."""
        first = kvs[0]
        if first.lengths is None:
            return [first.length] * batch
        lengths: list[int] = first.lengths.tolist()
        return lengths

    @staticmethod
    def set(kvs: Sequence[KVCache], lengths: Sequence[int]) -> None:
        """Every layer's rows now hold `lengths` positions (host ints)."""
        lengths = list(lengths)
        width = max(lengths, default=0)
        per_row = None
        if len(set(lengths)) > 1:
            device = next((kv.k_buf.device for kv in kvs if kv.k_buf is not None), None)
            per_row = torch.tensor(lengths, dtype=torch.long, device=device)
        for kv in kvs:
            kv.set_lengths(per_row, width)


__all__ = ["KV", "DecodingCache", "KVCache", "LayerKV", "RowLengths"]
