"""Recurrent baselines: an LSTM / GRU encoder-decoder with additive attention (Bahdanau et al., 2015), an
LSTM / GRU language model, and a bidirectional LSTM / GRU text classifier.

They implement the interfaces of `Seq2Seq` (encode / decode / start_cache / decode_step) and
`LanguageModel` (forward with a cache), so the trainer, the tasks, beam search and sampling are shared with
the Transformer. Unlike the Transformer, the decoder's teacher-forced pass is a loop over target
positions (each step needs the previous hidden state): that sequential dependence is what the
`parallelism` experiment measures.

Sizes come from the family configs: d_model is the hidden and embedding size, n_layers the number of
recurrent layers (encoder and decoder), dropout is applied to embeddings, between layers and before the
output projection.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tformer.config import ClassifierConfig, LMConfig, Seq2SeqConfig
from tformer.models.classifier import ClassifierOutput
from tformer.models.lm import LMOutput, cache_capacity
from tformer.models.seq2seq import Seq2SeqOutput
from tformer.models.stack import check_ids

State = Tensor | tuple[Tensor, Tensor]  # GRU: h (L, B, H); LSTM: (h, c)


def _rnn(kind: str, d_in: int, d_hidden: int, layers: int, dropout: float, bidirectional: bool) -> nn.RNNBase:
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    return cls(
        d_in,
        d_hidden,
        num_layers=layers,
        dropout=dropout if layers > 1 else 0.0,
        batch_first=True,
        bidirectional=bidirectional,
    )


def _select_state(state: State, index: Tensor) -> State:
    if isinstance(state, tuple):
        return (state[0].index_select(1, index), state[1].index_select(1, index))
    return state.index_select(1, index)


def _top(state: State) -> Tensor:
    """The last layer's hidden state, (B, H)."""
    h = state[0] if isinstance(state, tuple) else state
    return h[-1]


class AdditiveAttention(nn.Module):
    """score(s, h_j) = v^T tanh(W s + U h_j) (Bahdanau et al., 2015, appendix A.1.2); U h_j is computed once
    per source (`keys`), as the Transformer's cross-attention keys are."""

    def __init__(self, d_query: int, d_memory: int, d_attn: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_query, d_attn, bias=False)
        self.key = nn.Linear(d_memory, d_attn)
        self.v = nn.Linear(d_attn, 1, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        return self.key(memory)  # (B, S, A)

    def forward(
        self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """query (B, H), keys (B, S, A), memory (B, S, C), mask (B, S) True = real -> context (B, C), weights (B, S)."""
        scores = self.v(torch.tanh(self.query(query)[:, None, :] + keys)).squeeze(-1)  # (B, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights[:, None, :], memory).squeeze(1), weights


@dataclass
class RNNDecoderCache:
    """What incremental decoding keeps: the encoder's states and attention keys (per source), the decoder's
    recurrent state (per hypothesis). Passed in, updated in place and returned, as `DecoderCache` (its
    state is fixed-size, so it needs no capacity); a `DecodingCache` (attention/kv_cache.py)."""

    memory: Tensor  # (B, S, C)
    keys: Tensor  # (B, S, A)
    memory_mask: Tensor | None  # (B, 1, 1, S), as Seq2Seq returns it
    state: State
    length: int = 0

    def index_select(self, index: Tensor, *, cross: bool = True) -> RNNDecoderCache:
        """Keep / reorder rows. `cross=False` keeps the per-source part (beams of one source share it)."""
        mask = self.memory_mask
        return RNNDecoderCache(
            self.memory.index_select(0, index) if cross else self.memory,
            self.keys.index_select(0, index) if cross else self.keys,
            mask.index_select(0, index) if cross and mask is not None else mask,
            _select_state(self.state, index),
            self.length,
        )

    def reorder_(self, index: Tensor) -> None:
        """Reorder the hypotheses' recurrent state (beam search: beams move within their source, whose
        rows share the encoder part, which stays as it is)."""
        self.state = _select_state(self.state, index)

    def clone(self) -> RNNDecoderCache:
        """An independent copy: decoding replaces `state` rather than writing into it, so sharing the
        tensors is safe."""
        return replace(self)


class RNNSeq2Seq(nn.Module):
    """Encoder: (bidirectional) LSTM/GRU over the source. Decoder: LSTM/GRU whose input at step t is
    [embedding of y_{t-1}; context c_t], where c_t attends over the encoder states with the previous top
    hidden state as query; logits from [s_t; c_t; embedding] (the deep output of Bahdanau et al.)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = c = config
        kind, d, n = c.architecture, c.d_model, c.n_layers
        if kind not in ("lstm", "gru"):
            raise ValueError(f"RNNSeq2Seq needs architecture 'lstm' or 'gru', got {kind!r}")
        self.src_embed = nn.Embedding(c.src_vocab_size, d, padding_idx=c.pad_id)
        self.tgt_embed = (
            self.src_embed if c.share_embeddings else nn.Embedding(c.tgt_vocab_size, d, padding_idx=c.pad_id)
        )
        self.encoder = _rnn(kind, d, d // 2 if c.bidirectional else d, n, c.dropout, c.bidirectional)
        self.decoder = _rnn(kind, 2 * d, d, c.decoder_layers, c.dropout, False)
        self.attention = AdditiveAttention(d, d, d)
        self.init_state = nn.Linear(d, d)  # first decoder state from the mean encoder state
        self.pre_output = nn.Linear(3 * d, d)
        self.output = nn.Linear(d, c.tgt_vocab_size, bias=False)
        if c.tie_output:
            self.output.weight = self.tgt_embed.weight
        self.dropout = nn.Dropout(c.dropout)
        nn.init.normal_(self.src_embed.weight, std=d**-0.5)
        if not c.share_embeddings:
            nn.init.normal_(self.tgt_embed.weight, std=d**-0.5)
        with torch.no_grad():
            self.src_embed.weight[c.pad_id].zero_()
            self.tgt_embed.weight[c.pad_id].zero_()

    # --- encoder -----------------------------------------------------------------------------------
    def encode(
        self, src: Tensor, *, src_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """(B, S) ids -> encoder states (B, S, C), key mask (B, 1, 1, S), None (no self-attention)."""
        c = self.config
        check_ids(src, vocab_size=c.src_vocab_size, max_len=c.max_seq_len, name="src")
        mask = src != c.pad_id if src_mask is None else src_mask
        if mask.shape != src.shape or mask.dtype != torch.bool:
            raise ValueError(f"src_mask must be a bool tensor shaped like src {tuple(src.shape)}")
        lengths = mask.sum(1).clamp(min=1).cpu()
        x = self.dropout(self.src_embed(src))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        return memory, mask[:, None, None, :], None

    # --- decoder -----------------------------------------------------------------------------------
    def start_cache(
        self, memory: Tensor, memory_mask: Tensor | None, *, capacity: int | None = None
    ) -> RNNDecoderCache:
        """Attention keys of the encoder states and the first decoder state, once per source. `capacity`
        is accepted for the decoding loops' sake and unused: a recurrent state does not grow."""
        if memory_mask is None:
            mean = memory.mean(1)
        else:
            keep = memory_mask[:, 0, 0, :, None].to(memory.dtype)
            mean = (memory * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        h0 = torch.tanh(self.init_state(mean))[None].expand(self.config.decoder_layers, -1, -1).contiguous()
        state: State = (h0, torch.zeros_like(h0)) if self.config.architecture == "lstm" else h0
        return RNNDecoderCache(memory, self.attention.keys(memory), memory_mask, state)

    def decode_step(
        self, tgt: Tensor, cache: RNNDecoderCache, *, need_weights: bool = False, checked: bool = False
    ) -> Seq2SeqOutput:
        """Feed the next (B, T) target tokens after `cache.length` earlier ones, one position at a time;
        the cache is updated in place and returned. `checked` skips validating `tgt` (a decoding loop
        feeding back tokens it chose)."""
        c = self.config
        if tgt.shape[0] != cache.memory.shape[0]:
            raise ValueError(f"tgt has batch size {tgt.shape[0]} but the cache has {cache.memory.shape[0]}")
        if cache.length + tgt.shape[1] > c.max_seq_len:
            raise ValueError(f"cannot decode past the model's max_seq_len = {c.max_seq_len} target positions")
        if not checked:
            check_ids(tgt, vocab_size=c.tgt_vocab_size, max_len=c.max_seq_len, name="tgt")
        mask = None if cache.memory_mask is None else cache.memory_mask[:, 0, 0, :]
        emb = self.dropout(self.tgt_embed(tgt))  # (B, T, C)
        state = cache.state
        outputs, weights = [], []
        for t in range(tgt.shape[1]):
            context, w = self.attention(_top(state), cache.keys, cache.memory, mask)
            step_in = torch.cat([emb[:, t], context], dim=-1)[:, None, :]  # (B, 1, 2C)
            out, state = self.decoder(step_in, state)
            outputs.append(torch.cat([out[:, 0], context, emb[:, t]], dim=-1))
            weights.append(w)
        hidden = torch.tanh(self.pre_output(self.dropout(torch.stack(outputs, dim=1))))  # (B, T, C)
        logits = self.output(self.dropout(hidden))
        cache.state, cache.length = state, cache.length + tgt.shape[1]
        cross = [torch.stack(weights, dim=1)[:, None]] if need_weights else None  # (B, 1, T, S)
        return Seq2SeqOutput(logits, cross_attention=cross, cache=cache)

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        *,
        tgt_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Seq2SeqOutput:
        """Teacher forcing: the T target positions one after another (an RNN cannot do them at once)."""
        if tgt_mask is not None:
            raise ValueError("an RNN decoder is causal by construction; tgt_mask is not supported")
        out = self.decode_step(tgt, self.start_cache(memory, memory_mask), need_weights=need_weights)
        out.cache = None
        return out

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Seq2SeqOutput:
        """src (B, S), tgt (B, T) decoder input (BOS first) -> logits (B, T, V) for the next tokens."""
        memory, memory_mask, _ = self.encode(src, src_mask=src_mask)
        if tgt.shape[0] != src.shape[0]:
            raise ValueError(f"tgt has batch size {tgt.shape[0]} but src has {src.shape[0]}; they must match")
        return self.decode(tgt, memory, memory_mask, tgt_mask=tgt_mask, need_weights=need_weights)


@dataclass
class RNNLMCache:
    """The recurrent state after the positions seen so far (None before the first), and how many there
    were. Updated in place like the Transformer's `LMCache`; `capacity` bounds `length` the same way (the
    generation loop re-reads a window when it is reached), though the state itself does not grow."""

    state: State | None
    length: int
    capacity: int

    def index_select(self, index: Tensor) -> RNNLMCache:
        state = None if self.state is None else _select_state(self.state, index)
        return RNNLMCache(state, self.length, self.capacity)

    def reorder_(self, index: Tensor) -> None:
        """Reorder batch rows (same batch size)."""
        if self.state is not None:
            self.state = _select_state(self.state, index)

    def clone(self) -> RNNLMCache:
        """An independent copy: the forward pass replaces `state` rather than writing into it."""
        return replace(self)

    def batch_size(self) -> int:
        assert self.state is not None
        return (self.state[0] if isinstance(self.state, tuple) else self.state).shape[1]

    def clear(self) -> None:
        """Forget every position seen (the next forward pass starts from the zero state)."""
        self.state, self.length = None, 0


class RNNLanguageModel(nn.Module):
    """Embedding -> LSTM/GRU layers -> linear output tied to the embedding (Press & Wolf, 2017).

    `forward(ids, cache=...)` continues from the cached state, so generation feeds the prompt once and then
    one token per step, as with the Transformer's KV cache."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.architecture not in ("lstm", "gru"):
            raise ValueError(f"RNNLanguageModel needs architecture 'lstm' or 'gru', got {c.architecture!r}")
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # as Zaremba et al. (2014) initialise LSTM LMs
        self.rnn = _rnn(c.architecture, c.d_model, c.d_model, c.n_layers, c.dropout, False)
        self.dropout = nn.Dropout(c.dropout)
        self.output = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_output:
            self.output.weight = self.embed.weight

    def new_cache(self, capacity: int | None = None) -> RNNLMCache:
        """An empty cache for up to `capacity` positions (default: max_seq_len), as LanguageModel's."""
        return RNNLMCache(None, 0, cache_capacity(capacity, self.config.max_seq_len))

    def forward(
        self,
        ids: Tensor,
        *,
        cache: RNNLMCache | None = None,
        use_cache: bool = False,
        need_weights: bool = False,
        last_only: bool = False,
        checked: bool = False,
    ) -> LMOutput:
        """ids (B, T) -> next-token logits (B, T, V), or (B, 1, V) with `last_only`; with `cache` (or
        `use_cache`, which starts one) the cache, updated in place. `checked` skips validating `ids`."""
        c = self.config
        if not checked:
            check_ids(ids, vocab_size=c.vocab_size, max_len=c.max_seq_len, name="ids")
        if cache is None and use_cache:
            cache = self.new_cache()
        if cache is not None:
            if cache.length + ids.shape[1] > cache.capacity:
                raise ValueError(
                    f"cache overflow: {cache.length} cached + {ids.shape[1]} new positions > capacity "
                    f"{cache.capacity}"
                )
            if cache.state is not None and cache.batch_size() != ids.shape[0]:
                raise ValueError(f"ids have batch size {ids.shape[0]} but the cache has {cache.batch_size()}")
        out, state = self.rnn(self.dropout(self.embed(ids)), None if cache is None else cache.state)
        if last_only:
            out = out[:, -1:]
        logits = self.output(self.dropout(out))
        if cache is not None:
            cache.state, cache.length = state, cache.length + ids.shape[1]
        return LMOutput(logits, cache)


class RNNClassifier(nn.Module):
    """Bidirectional LSTM / GRU over the text, max-pooled over the real positions, dropout, linear head
    (the usual recurrent sentence classifier, e.g. Conneau et al., 2017's BiLSTM-max)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.architecture not in ("lstm", "gru"):
            raise ValueError(f"RNNClassifier needs architecture 'lstm' or 'gru', got {c.architecture!r}")
        if c.d_model % 2:
            raise ValueError(
                f"RNNClassifier needs an even d_model (d_model / 2 per direction), got {c.d_model}"
            )
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        self.rnn = _rnn(c.architecture, c.d_model, c.d_model // 2, c.n_layers, c.dropout, True)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.d_model, c.n_classes)

    def forward(self, ids: Tensor, *, need_weights: bool = False) -> ClassifierOutput:
        """ids (B, T), padded with pad_id -> class logits (B, n_classes)."""
        c = self.config
        check_ids(ids, vocab_size=c.vocab_size, max_len=c.max_seq_len, name="ids")
        real = ids != c.pad_id
        lengths = real.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(
            self.dropout(self.embed(ids)), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # (B, T, C)
        keep = real.clone()
        keep[:, 0] = True  # an all-padding row pools its first (zero) state
        pooled = h.masked_fill(~keep[..., None], float("-inf")).amax(1)
        return ClassifierOutput(self.head(self.dropout(pooled)))

    @torch.no_grad()
    def probabilities(self, ids: Tensor) -> Tensor:
        return torch.softmax(self.forward(ids).logits.float(), dim=-1)
