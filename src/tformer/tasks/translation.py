"""Translation (the paper's task): parallel text -> Seq2Seq; label-smoothed loss; BLEU / exact match;
beam-search prediction from a checkpoint. The family's entry in tformer.families names `build`,
`Translator` and `evaluate_files`."""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from tformer.config import ConfigError, RunConfig, Seq2SeqConfig, TrainConfig
from tformer.data.batching import PairBatch, bucket_batches, make_pair_batch, pad
from tformer.data.readers import read_parallel, report_skipped
from tformer.data.tokenizers import Tokenizer
from tformer.families.roles import EvalRequest
from tformer.inference.batching import Reason, StepEvent
from tformer.inference.decoding import MaxLen, beam_search, beam_steps, greedy_decode
from tformer.inference.modes import evaluating
from tformer.inference.sampling import Sampling
from tformer.inference.seq2seq_batching import TranslationDecoder, TranslationRequest
from tformer.inference.streaming import TextStream
from tformer.metrics import bleu, chrf, exact_match, perplexity
from tformer.models import build_model
from tformer.models.seq2seq import Seq2Seq
from tformer.tasks.common import CheckpointPredictor, log, model_device, need, progress, tokenizer
from tformer.training.losses import sequence_cross_entropy
from tformer.training.trainer import LossValue

if TYPE_CHECKING:
    from tformer.viz.attention import AttentionMaps

SRC_TOKENIZER = "src_tokenizer.json"
TGT_TOKENIZER = "tgt_tokenizer.json"


def _encode_pairs(
    pairs: Sequence[tuple[str, str]], src_tok: Tokenizer, tgt_tok: Tokenizer, max_len: int, split: str
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Encode (source, target) texts; drop (and count) pairs too long for the model."""
    src_ids = src_tok.encode_batch([s for s, _ in pairs])
    tgt_ids = tgt_tok.encode_batch([t for _, t in pairs])
    keep = [
        i
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True))
        if len(s) <= max_len and len(t) < max_len
    ]
    if len(keep) < len(pairs):
        print(
            f"{split}: skipped {len(pairs) - len(keep)} of {len(pairs)} pairs longer than max_seq_len = {max_len}",
            file=sys.stderr,
        )
    return [src_ids[i] for i in keep], [tgt_ids[i] for i in keep], keep


class TranslationTask:
    """Source -> target text with the encoder-decoder; loss: label-smoothed cross-entropy per token."""

    name = "translation"

    def __init__(
        self,
        model_config: Seq2SeqConfig,
        train_config: TrainConfig,
        src_tokenizer: Tokenizer,
        tgt_tokenizer: Tokenizer,
        train: Sequence[tuple[str, str]],
        valid: Sequence[tuple[str, str]],
        *,
        eval_beam_size: int = 1,
        eval_max_sentences: int | None = 500,
    ) -> None:
        self.model_config, self.train_config = model_config, train_config
        self.src_tok, self.tgt_tok = src_tokenizer, tgt_tokenizer
        max_len = model_config.max_seq_len
        self.train_src, self.train_tgt, _ = _encode_pairs(
            train, src_tokenizer, tgt_tokenizer, max_len, "train"
        )
        self.valid_src, self.valid_tgt, kept = _encode_pairs(
            valid, src_tokenizer, tgt_tokenizer, max_len, "valid"
        )
        self.valid_refs = [valid[i][1] for i in kept]
        self.example = valid[kept[0]] if kept else None  # the pair whose attention the logs draw
        self.eval_beam_size = eval_beam_size
        self.eval_max_sentences = eval_max_sentences
        self._lengths = [len(s) + len(t) + 1 for s, t in zip(self.train_src, self.train_tgt, strict=True)]

    def _batch(self, idx: list[int], src: list[list[int]], tgt: list[list[int]]) -> PairBatch:
        t = self.tgt_tok
        return make_pair_batch(
            [src[i] for i in idx], [tgt[i] for i in idx], pad_id=t.pad_id, bos_id=t.bos_id, eos_id=t.eos_id
        )

    def train_batches(self, epoch: int) -> list[PairBatch]:
        c = self.train_config
        groups = bucket_batches(
            self._lengths,
            batch_tokens=c.batch_tokens,
            max_sentences=c.max_batch_sentences,
            seed=c.seed + epoch,
        )
        return [self._batch(g, self.train_src, self.train_tgt) for g in groups]

    def loss(self, model: Seq2Seq, batch: PairBatch) -> LossValue:
        batch = batch.to(model_device(model))
        logits = model(batch.src, batch.tgt_in).logits
        loss = sequence_cross_entropy(
            logits,
            batch.tgt_out,
            pad_id=self.tgt_tok.pad_id,
            label_smoothing=self.train_config.label_smoothing,
        )
        return LossValue(loss, batch.n_tokens, batch.n_tokens + batch.src.numel())

    def evaluate(self, model: Seq2Seq) -> dict[str, float]:
        """Validation NLL / perplexity (no smoothing) on every pair; BLEU and exact match on decoded ones.
        In eval mode, the model's own mode restored after (the Translator made here would keep it)."""
        with evaluating(model), torch.no_grad():
            return self._evaluate(model)

    def _evaluate(self, model: Seq2Seq) -> dict[str, float]:
        lengths = [len(s) + len(t) for s, t in zip(self.valid_src, self.valid_tgt, strict=True)]
        groups = bucket_batches(
            lengths, batch_tokens=self.train_config.batch_tokens, max_sentences=256, seed=None
        )
        nll, tokens = 0.0, 0
        for g in groups:
            b = self._batch(g, self.valid_src, self.valid_tgt).to(model_device(model))
            logits = model(b.src, b.tgt_in).logits
            nll += float(sequence_cross_entropy(logits, b.tgt_out, pad_id=self.tgt_tok.pad_id))
            tokens += b.n_tokens
        n = (
            len(self.valid_src)
            if self.eval_max_sentences is None
            else min(self.eval_max_sentences, len(self.valid_src))
        )
        translator = Translator(model, self.src_tok, self.tgt_tok)
        hyps = translator.translate_ids(self.valid_src[:n], beam_size=self.eval_beam_size)
        refs = self.valid_refs[:n]
        return {
            "valid_nll": nll / max(1, tokens),
            "valid_ppl": perplexity(nll / max(1, tokens)),
            "bleu": bleu(hyps, refs).score,
            "chrf": chrf(hyps, refs),
            "exact_match": exact_match(hyps, refs),
        }

    def attention_maps(self, model: Seq2Seq) -> AttentionMaps | None:
        """The first validation pair's attention, teacher-forced on its reference (for the logs)."""
        from tformer.viz.attention import translation_maps

        if self.example is None:
            return None
        source, target = self.example
        return translation_maps(Translator(model, self.src_tok, self.tgt_tok), source, target=target)

    def checkpoint_config(self) -> dict[str, object]:
        return {"task": self.name, "model": self.model_config.to_dict()}

    def write_files(self, directory: Path) -> None:
        self.src_tok.save(directory / SRC_TOKENIZER)
        self.tgt_tok.save(directory / TGT_TOKENIZER)


class Translator(CheckpointPredictor):
    """A trained encoder-decoder with its tokenizers: text in, text out (`load`: tasks/common.py)."""

    family = "translation"

    def __init__(self, model: Seq2Seq, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer) -> None:
        self.model, self.src_tok, self.tgt_tok = model.eval(), src_tokenizer, tgt_tokenizer

    @classmethod
    def from_checkpoint(cls, path: Path, raw: Mapping[str, object], model: torch.nn.Module) -> Translator:
        # a baseline (models/rnn.py) has the same interface
        src_tok, tgt_tok = Tokenizer.load(path / SRC_TOKENIZER), Tokenizer.load(path / TGT_TOKENIZER)
        return cls(cast(Seq2Seq, model), src_tok, tgt_tok)

    def translate_ids(
        self,
        sources: Sequence[Sequence[int]],
        *,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        max_len: MaxLen = None,
        batch_size: int = 128,
        show_progress: bool = True,
        sampling: Sampling | Sequence[Sampling | None] | None = None,
    ) -> list[str]:
        """Decode pre-tokenised sources, in length-sorted batches, returning texts in input order. `max_len`:
        output tokens, one limit or one per source (None, for all or a source: its default, 2 S + 10); a
        source's translation does not depend on its batch-mates (each row stops at its own limit).
        `show_progress=False`: no progress bar even on a terminal (a server calls this per batch).
        `sampling` (beam_size 1 only; for all sources or one per source): draw tokens instead of the argmax
        (tformer.inference.Sampling: temperature, top_k, top_p, seed), each source with its own generator."""
        model, t = self.model, self.tgt_tok
        device = model_device(model)
        limits = None if max_len is None or isinstance(max_len, int) else list(max_len)
        if limits is not None and len(limits) != len(sources):
            raise ValueError(f"max_len has {len(limits)} entries; expected one per source ({len(sources)})")
        draws = None if sampling is None or isinstance(sampling, Sampling) else list(sampling)
        if sampling is not None and beam_size != 1:
            raise ValueError(f"sampling decodes one hypothesis: it needs beam_size = 1, got {beam_size}")
        if draws is not None and len(draws) != len(sources):
            raise ValueError(f"sampling has {len(draws)} entries; expected one per source ({len(sources)})")
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out: list[str] = [""] * len(sources)
        starts = range(0, len(order), batch_size)
        for start in progress(starts, len(starts), "decoding") if show_progress else starts:
            idx = order[start : start + batch_size]
            src = pad([sources[i] for i in idx], self.src_tok.pad_id).to(device)  # (B, S)
            row_max: MaxLen = max_len if limits is None else [limits[i] for i in idx]
            if beam_size == 1:
                row_sampling = sampling if draws is None else [draws[i] for i in idx]
                hyps = greedy_decode(
                    model, src, bos_id=t.bos_id, eos_id=t.eos_id, max_len=row_max, sampling=row_sampling
                )
            else:
                hyps = [
                    h[0]
                    for h in beam_search(
                        model,
                        src,
                        bos_id=t.bos_id,
                        eos_id=t.eos_id,
                        beam_size=beam_size,
                        length_penalty_alpha=length_penalty,
                        max_len=row_max,
                    )
                ]
            for i, h in zip(idx, hyps, strict=True):
                out[i] = t.decode(h.tokens)
        return out

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        limit = self.model.config.max_seq_len
        ids = self.src_tok.encode_batch(list(texts))
        for n, row in enumerate(ids, 1):
            if len(row) > limit:
                raise ValueError(
                    f"input {n} has {len(row)} tokens, more than the model's max_seq_len = {limit}: {texts[n - 1][:60]!r}"
                )
            if not row:
                raise ValueError(f"input {n} is empty: nothing to translate")
        return ids

    def translate(
        self,
        texts: Sequence[str],
        *,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        max_len: MaxLen = None,
        batch_size: int = 128,
        sampling: Sampling | Sequence[Sampling | None] | None = None,
    ) -> list[str]:
        """Translate sentences (beam search; greedy with beam_size = 1), as `translate_ids` does."""
        return self.translate_ids(
            self.encode(texts),
            beam_size=beam_size,
            length_penalty=length_penalty,
            max_len=max_len,
            batch_size=batch_size,
            sampling=sampling,
        )

    def batch_decoder(self, *, max_batch: int = 16) -> TranslationDecoder:
        """Greedy translation with continuous batching (tformer.inference.seq2seq_batching): add sources,
        step, cancel; each result equals `translate([text], beam_size=1)`. One thread drives it."""
        return TranslationDecoder(cast(Seq2Seq, self.model), self.src_tok, self.tgt_tok, max_batch=max_batch)

    def beam_stream(
        self,
        texts: Sequence[str],
        *,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        max_len: MaxLen = None,
    ) -> Generator[list[StepEvent], None, None]:
        """Beam search over `texts` together (one padded batch; equal beam parameters), one list of events
        per decoding step (handle = index into texts): each source's text grows by the prefix that all its
        live beams and its best finished hypothesis share, so it never takes a word back, and its finished event
        completes the text to exactly `translate`'s (with the hypothesis's score)."""
        ids = self.encode(texts)
        device = model_device(self.model)
        src = pad(ids, self.src_tok.pad_id).to(device)
        t = self.tgt_tok
        search = beam_steps(
            self.model, src, bos_id=t.bos_id, eos_id=t.eos_id, beam_size=beam_size,
            length_penalty_alpha=length_penalty, max_len=max_len, progress=True,
        )  # fmt: skip
        streams = [TextStream() for _ in ids]
        open_rows = set(range(len(ids)))
        with evaluating(self.model):
            while open_rows:
                with torch.no_grad():
                    report = next(search)  # the last step reports every source done
                events = []
                for i in sorted(open_rows):
                    tokens, best = report[i]
                    text = t.decode(tokens)
                    if best is None:
                        events.append(StepEvent(i, streams[i].update(text)[0], False, None, len(tokens)))
                        continue
                    reason: Reason = "eos" if best.finished else "length"
                    events.append(
                        StepEvent(i, streams[i].finish(text), True, reason, len(tokens), best.score)
                    )
                    open_rows.discard(i)
                yield events

    def translate_stream(
        self, text: str, *, beam_size: int = 4, length_penalty: float = 0.6, max_len: int | None = None
    ) -> Iterator[str]:
        """The translation of one sentence as text deltas that join to exactly `translate([text], ...)[0]`:
        greedy (beam_size = 1) streams its hypothesis as it grows, beam search the prefix all its beams
        agree on."""
        if beam_size == 1:
            decoder = self.batch_decoder(max_batch=1)
            decoder.add(TranslationRequest(text, max_len))
            while len(decoder):
                for event in decoder.step():
                    if event.text:
                        yield event.text
            return
        for events in self.beam_stream(
            [text], beam_size=beam_size, length_penalty=length_penalty, max_len=max_len
        ):
            for event in events:
                if event.text:
                    yield event.text


def build(config: RunConfig, saved: Path | None = None) -> tuple[TranslationTask, torch.nn.Module]:
    """`tformer train translation`: parallel files -> tokenizers (one shared, or source and target) ->
    task and model (vocabulary sizes filled in). `saved`: a checkpoint being resumed (its tokenizers)."""
    d = config.data
    train_pairs, stats = read_parallel(need(config, "train"))
    report_skipped(stats)
    valid_pairs, vstats = read_parallel(need(config, "valid"))
    report_skipped(vstats)
    log(f"translation: {len(train_pairs):,} training pairs, {len(valid_pairs):,} validation pairs")
    from tformer.interop.init_from import run_start

    start = run_start(config)  # train.init_from: the source's tokenizers, architecture and weights
    if start is not None:
        src_tok, tgt_tok = start.tokenizers[SRC_TOKENIZER], start.tokenizers[TGT_TOKENIZER]
    elif d.shared_vocab:
        src_tok = tgt_tok = tokenizer(saved, SRC_TOKENIZER, (x for pair in train_pairs for x in pair), config)
    else:
        src_tok = tokenizer(saved, SRC_TOKENIZER, (s for s, _ in train_pairs), config)
        tgt_tok = tokenizer(saved, TGT_TOKENIZER, (t for _, t in train_pairs), config)
    model_config = config.model.replace(
        src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size, pad_id=tgt_tok.pad_id
    )
    model_config = start.model_config(config.model) if start else model_config
    if model_config.share_embeddings and not d.shared_vocab:
        raise ConfigError("model.share_embeddings needs data.shared_vocab = true (one vocabulary)")
    log(
        f"tokenizer: {d.tokenizer}, vocabulary {src_tok.vocab_size:,}"
        + ("" if d.shared_vocab else f" (source) / {tgt_tok.vocab_size:,} (target)")
    )
    task = TranslationTask(
        model_config,
        config.train,
        src_tok,
        tgt_tok,
        train_pairs,
        valid_pairs,
        eval_beam_size=config.train.eval_beam_size,
        eval_max_sentences=config.train.eval_max_sentences,
    )
    return task, start.build(model_config) if start else build_model(model_config)


def evaluate_files(path: Path, data: list[str], request: EvalRequest) -> dict[str, object]:
    """`tformer eval` of a translation checkpoint: BLEU, chrF and exact match of its beam search on
    parallel `data` (sentences longer than max_seq_len are skipped, and counted)."""
    predictor = Translator.load(path, precision=request.precision, accel=request.accel)
    pairs, stats = read_parallel(data)
    report_skipped(stats)
    limit = predictor.model.config.max_seq_len
    fits = [p for p in pairs if len(predictor.src_tok.encode(p[0])) <= limit]
    if len(fits) < len(pairs):
        log(f"skipped {len(pairs) - len(fits)} of {len(pairs)} sentences longer than max_seq_len = {limit}")
    hyps = predictor.translate([s for s, _ in fits], beam_size=request.beam_size)
    refs = [t for _, t in fits]
    score = bleu(hyps, refs)
    return {
        "sentences": len(refs),
        "bleu": score.score,
        "bleu_signature": score.signature,
        "chrf": chrf(hyps, refs),
        "exact_match": exact_match(hyps, refs),
    }
