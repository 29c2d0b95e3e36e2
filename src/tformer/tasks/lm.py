"""Language modelling: plain text -> LanguageModel; next-token cross-entropy; perplexity; sampling from a
checkpoint.

Training batches are random windows of max_seq_len + 1 tokens (as nanoGPT draws them): an "epoch" is
len(train) / (batch_size * max_seq_len) such batches, drawn with a generator seeded by (seed, epoch), so a
resumed run draws the same ones. Validation reads the whole validation text once, in consecutive windows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, overload

import torch
import torch.nn.functional as F

from tformer.config import ConfigError, LMConfig, RunConfig, TrainConfig
from tformer.data.readers import read_text
from tformer.data.tokenizers import Tokenizer
from tformer.families.roles import EvalRequest
from tformer.inference.batching import BatchDecoder, GenerationRequest
from tformer.inference.modes import evaluating
from tformer.inference.sampling import generate, generate_steps
from tformer.inference.streaming import Continuation, TextStream, cut_at_stop
from tformer.metrics import perplexity
from tformer.models import build_model
from tformer.models.lm import LanguageModel
from tformer.tasks.common import CheckpointPredictor, log, model_device, one, progress, tokenizer
from tformer.training.trainer import LossValue

if TYPE_CHECKING:
    from tformer.viz.attention import AttentionMaps

TOKENIZER = "tokenizer.json"


@dataclass
class WindowBatch:
    starts: torch.Tensor  # (B,) offsets into the token stream; windows are materialised in `loss`


def windows(data: torch.Tensor, starts: torch.Tensor, t: int) -> torch.Tensor:
    """(B,) start offsets into a token stream -> (B, T + 1) windows: inputs [:, :-1], targets [:, 1:]."""
    return data[starts[:, None] + torch.arange(t + 1)]


def mean_nll(model: LanguageModel, ids: torch.Tensor, *, windows_per_batch: int = 64) -> float:
    """Mean next-token NLL (nats) over a token stream, read in consecutive max_seq_len windows; in eval
    mode, without writing to a model already in it (tformer.inference.modes)."""
    with evaluating(model), torch.no_grad():
        return _mean_nll(model, ids, windows_per_batch)


def _mean_nll(model: LanguageModel, ids: torch.Tensor, windows_per_batch: int) -> float:
    t = model.config.max_seq_len
    if len(ids) < t + 1:
        raise ValueError(f"text has {len(ids)} tokens; need at least max_seq_len + 1 = {t + 1}")
    device = model_device(model)
    starts = torch.arange((len(ids) - 1) // t) * t
    total, count = 0.0, 0
    chunks = starts.split(windows_per_batch)
    for chunk in progress(chunks, len(chunks), "perplexity"):
        w = windows(ids, chunk, t).to(device)
        logits = model(w[:, :-1]).logits
        total += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += w[:, 1:].numel()
    return total / count


class LanguageModelTask:
    name = "lm"

    def __init__(
        self,
        model_config: LMConfig,
        train_config: TrainConfig,
        tokenizer: Tokenizer,
        train_text: str,
        valid_text: str,
        *,
        eval_max_tokens: int | None = None,
    ) -> None:
        self.model_config, self.train_config, self.tok = model_config, train_config, tokenizer
        self.train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
        self.valid_ids = torch.tensor(tokenizer.encode(valid_text), dtype=torch.long)
        if eval_max_tokens is not None:
            self.valid_ids = self.valid_ids[:eval_max_tokens]
        t = model_config.max_seq_len
        for name, ids in (("train", self.train_ids), ("valid", self.valid_ids)):
            if len(ids) < t + 1:
                raise ValueError(
                    f"the {name} text has {len(ids)} tokens; need at least max_seq_len + 1 = {t + 1} (a longer "
                    "file, a larger data.valid_fraction, or a smaller model.max_seq_len)"
                )
        self.batch_size = train_config.batch_size or max(1, train_config.batch_tokens // t)
        # the text whose attention the logs draw: the validation text's start, well inside max_seq_len
        self.example = tokenizer.decode(self.valid_ids[: max(1, min(48, t // 2))].tolist())

    def train_batches(self, epoch: int) -> list[WindowBatch]:
        t, b = self.model_config.max_seq_len, self.batch_size
        n = max(1, len(self.train_ids) // (b * t))
        g = torch.Generator().manual_seed(self.train_config.seed * 100_003 + epoch)
        starts = torch.randint(len(self.train_ids) - t, (n, b), generator=g)
        return [WindowBatch(s) for s in starts]

    def loss(self, model: LanguageModel, batch: WindowBatch) -> LossValue:
        w = windows(self.train_ids, batch.starts, self.model_config.max_seq_len)
        x, y = w[:, :-1], w[:, 1:]
        device = model_device(model)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        return LossValue(loss, y.numel(), y.numel())

    def evaluate(self, model: LanguageModel) -> dict[str, float]:
        nll = mean_nll(model, self.valid_ids)
        return {"valid_nll": nll, "valid_ppl": perplexity(nll)}

    def attention_maps(self, model: LanguageModel) -> AttentionMaps | None:
        """The validation text's first tokens, causal self-attention (for the logs)."""
        from tformer.viz.attention import lm_maps

        if not self.tok.encode(self.example):
            return None
        return lm_maps(TextGenerator(model, self.tok), self.example)

    def checkpoint_config(self) -> dict[str, object]:
        return {"task": self.name, "model": self.model_config.to_dict()}

    def write_files(self, directory: Path) -> None:
        self.tok.save(directory / TOKENIZER)


class TextGenerator(CheckpointPredictor):
    """A trained language model with its tokenizer: prompt in, continuation out (`load`: tasks/common.py)."""

    family = "lm"

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer) -> None:
        self.model, self.tok = model.eval(), tokenizer

    @classmethod
    def from_checkpoint(cls, path: Path, raw: Mapping[str, object], model: torch.nn.Module) -> TextGenerator:
        # a baseline (models/rnn.py) has the same interface
        return cls(cast(LanguageModel, model), Tokenizer.load(path / TOKENIZER))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids generation starts from: the prompt's, or BOS for an empty prompt (a longer prompt than
        max_seq_len is read from its last max_seq_len tokens)."""
        return self.tok.encode(prompt) or [self.tok.bos_id]

    @overload
    def generate(
        self, prompt: str, *, max_new_tokens: int = ..., temperature: float = ..., top_k: int | None = ...,
        top_p: float | None = ..., greedy: bool = ..., seed: int | None = ..., stop: Sequence[str] = ...,
        compile: bool | None = ..., stream: Literal[False] = ...,
    ) -> str: ...  # fmt: skip

    @overload
    def generate(
        self, prompt: str, *, max_new_tokens: int = ..., temperature: float = ..., top_k: int | None = ...,
        top_p: float | None = ..., greedy: bool = ..., seed: int | None = ..., stop: Sequence[str] = ...,
        compile: bool | None = ..., stream: Literal[True],
    ) -> Iterator[str]: ...  # fmt: skip

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        seed: int | None = None,
        stop: Sequence[str] = (),
        compile: bool | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The continuation of `prompt` (without the prompt), cut before the first stop string. `compile`:
        compiled matrix-vector kernels for the decoding steps (True), none (False), or where this machine
        measured them faster (None; see tformer.inference.generate). `stream=True`: an iterator of text
        deltas as tokens are produced, which join to exactly the text returned otherwise (text that could
        start a stop string, or an incomplete character, is held back until decided:
        tformer.inference.streaming)."""
        if isinstance(stop, str):
            raise TypeError(f"stop must be a sequence of strings, got the string {stop!r}")
        ids = self.prompt_ids(prompt)
        prompt_ids = torch.tensor([ids], device=model_device(self.model))
        continuation = Continuation(self.tok, ids)
        if stream:
            steps = generate_steps(
                self.model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, greedy=greedy, seed=seed, eos_id=self.tok.eos_id, compile=compile,
            )  # fmt: skip
            return self._stream(steps, continuation, stop, ids)

        def stopped(seq: torch.Tensor) -> bool:
            return bool(stop) and any(s in continuation(seq[0].tolist()) for s in stop)

        out = generate(
            self.model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, greedy=greedy, seed=seed, eos_id=self.tok.eos_id, stop=stopped, compile=compile,
        )  # fmt: skip
        text = continuation(out[0].tolist())
        cut = cut_at_stop(text, stop)
        return text if cut is None else cut

    @staticmethod
    def _stream(
        steps: Iterator[torch.Tensor], continuation: Continuation, stop: Sequence[str], prompt: list[int]
    ) -> Iterator[str]:
        text_stream = TextStream(stop)
        seq = prompt  # the ids so far
        for ids in steps:
            seq = ids[0].tolist()
            delta, stopped = text_stream.update(continuation(seq))
            if delta:
                yield delta
            if stopped:
                return
        tail = text_stream.finish(continuation(seq))
        if tail:
            yield tail

    def batch_decoder(self, *, max_batch: int = 16, compile: bool | None = None) -> BatchDecoder:
        """A continuous-batching decoder over this model (tformer.inference.batching): add requests, step,
        cancel; each request's text equals `generate`'s for the same arguments. One thread drives it."""
        return BatchDecoder(self.model, self.tok, max_batch=max_batch, compile=compile)

    def generate_batch(
        self, requests: Sequence[GenerationRequest], *, max_batch: int = 16, compile: bool | None = None
    ) -> list[str]:
        """Many prompts decoded together (`batch_decoder`), each with its own parameters -> their texts,
        in order, each equal to `generate` of that request alone."""
        decoder = self.batch_decoder(max_batch=max_batch, compile=compile)
        handles = [decoder.add(r) for r in requests]
        texts = {h: "" for h in handles}
        while len(decoder):
            for event in decoder.step():
                texts[event.handle] += event.text
        return [texts[h] for h in handles]


def build(config: RunConfig, saved: Path | None = None) -> tuple[LanguageModelTask, torch.nn.Module]:
    """`tformer train lm`: a text file (validation: another, or its last data.valid_fraction) ->
    tokenizer -> task and model. `saved`: a checkpoint being resumed (its tokenizer)."""
    d = config.data
    (train_path,) = one(config, "train")
    text = read_text(train_path)
    if config.data.valid:
        (valid_path,) = one(config, "valid")
        train_text, valid_text = text, read_text(valid_path)
    elif d.valid_fraction > 0:
        cut = int(len(text) * (1 - d.valid_fraction))
        train_text, valid_text = text[:cut], text[cut:]
    else:
        raise ConfigError("no validation text: give --valid FILE or data.valid_fraction (e.g. 0.1)")
    from tformer.interop.init_from import run_start

    start = run_start(config)  # train.init_from: the source's tokenizer, architecture and weights
    lines = train_text.splitlines(keepends=True)
    tok = start.tokenizer if start else tokenizer(saved, TOKENIZER, lines, config)
    log(
        f"lm: {len(train_text):,} training and {len(valid_text):,} validation characters; "
        f"tokenizer {d.tokenizer}, vocabulary {tok.vocab_size:,}"
    )
    model_config = config.model.replace(vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    model_config = start.model_config(config.model) if start else model_config
    task = LanguageModelTask(model_config, config.train, tok, train_text, valid_text)
    return task, start.build(model_config) if start else build_model(model_config)


def evaluate_files(path: Path, data: list[str], request: EvalRequest) -> dict[str, object]:
    """`tformer eval` of a language model: mean NLL and perplexity over one text file."""
    predictor = TextGenerator.load(path, precision=request.precision, accel=request.accel)
    if len(data) != 1:
        raise ConfigError(f"lm: --data takes one file, got {len(data)}")
    ids = torch.tensor(predictor.tok.encode(read_text(data[0])), dtype=torch.long)
    nll = mean_nll(predictor.model, ids)  # predictors hold their model in eval mode
    return {"tokens": len(ids), "nll": nll, "perplexity": perplexity(nll)}
