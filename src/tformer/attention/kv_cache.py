"""Caches for incremental decoding, under two protocols.

`DecodingCache` is what a decoding loop needs from any model's cache, whatever the model keeps in it:
`length`, `index_select`, `reorder_`, `clone`. Six types follow it: a layer's `KV` and `KVCache` (here),
`DecoderCache` (models/decoder.py), `LMCache` (models/lm.py), `RNNDecoderCache` and `RNNLMCache`
(models/rnn.py). `LayerKV` is what an attention layer reads back: `KV` (keys and values as tensors, grown
by concatenation) and `KVCache` (preallocated buffers written in place).

Every row of a batch has the same `length` today: all rows start together. Continuous batching (rows
joining and leaving a running batch) extends the protocol by a `lengths` (B,) tensor, the filled positions
of each row, with `length` its maximum; a layer then builds its key mask from `lengths`
(attention/masks.py makes masks from lengths) and writes each row at its own offset. Nothing in the
decoding loops below the protocol needs to change for that.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, TypeVar

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
    (B, H_kv, capacity, D), of which the first `length` positions are filled.

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

    def append(self, k: Tensor, v: Tensor) -> KV:
        """Write T new positions (B, H_kv, T, D) after the filled ones; -> views of all filled positions."""
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
        self.k_buf[:, :, self.length : end] = k
        self.v_buf[:, :, self.length : end] = v
        self.length = end
        return KV(self.k_buf[:, :, :end], self.v_buf[:, :, :end])

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

    def index_select(self, index: Tensor) -> KVCache:
        """A new cache holding batch rows `index` (B',) of this one (any B'), same capacity."""
        new = KVCache(self.capacity)
        new.length = self.length
        if self.k_buf is not None and self.v_buf is not None:
            new.k_buf = self.k_buf.index_select(0, index)
            new.v_buf = self.v_buf.index_select(0, index)
        return new

    def clone(self) -> KVCache:
        new = KVCache(self.capacity)
        new.length = self.length
        if self.k_buf is not None and self.v_buf is not None:
            new.k_buf, new.v_buf = self.k_buf.clone(), self.v_buf.clone()
        return new

    def clear(self) -> None:
        """Forget the cached positions (the buffers stay allocated)."""
        self.length = 0


__all__ = ["KV", "DecodingCache", "KVCache", "LayerKV"]
