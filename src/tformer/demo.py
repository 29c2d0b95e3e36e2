"""`tformer demo`: the main job, end to end on data the package makes itself.

French number words -> English number words (see data/synthetic.py): generate the splits, learn word
vocabularies, train a small paper-style Transformer on the CPU, beam-search the held-out numbers, report
exact match and BLEU, draw a cross-attention heatmap and the loss curve, save the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.config import Seq2SeqConfig, TrainConfig
from tformer.data.synthetic import number_translation
from tformer.data.tokenizers import Tokenizer
from tformer.metrics import bleu, exact_match
from tformer.models.seq2seq import Seq2Seq
from tformer.tasks import TranslationTask, Translator
from tformer.training.trainer import Trainer
from tformer.viz.attention import translation_maps
from tformer.viz.plots import attention_heatmap, loss_curve


@dataclass(frozen=True)
class DemoSize:
    n_train: int
    n_valid: int
    n_test: int
    model: Seq2SeqConfig
    train: TrainConfig
    beam_size: int = 4


def demo_size(quick: bool, seed: int = 0) -> DemoSize:
    """The full demo (a few minutes on 2 CPU cores) or a quick one (seconds, for tests)."""
    if quick:
        model = Seq2SeqConfig(d_model=64, n_heads=4, d_ff=128, n_layers=2, dropout=0.0, max_seq_len=32)
        train = TrainConfig(
            epochs=6,
            batch_tokens=1500,
            lr=3e-3,
            warmup_steps=30,
            seed=seed,
            log_every=10,
            label_smoothing=0.0,
        )
        return DemoSize(2000, 200, 200, model, train, beam_size=2)
    model = Seq2SeqConfig(d_model=128, n_heads=4, d_ff=512, n_layers=3, dropout=0.1, max_seq_len=48)
    train = TrainConfig(
        epochs=5, max_time=230.0, batch_tokens=3000, lr=2e-3, warmup_steps=400, seed=seed, log_every=25
    )
    return DemoSize(30000, 500, 1000, model, train)


@dataclass
class DemoResult:
    exact_match: float
    bleu: float
    bleu_signature: str
    checkpoint: Path
    heatmap: Path
    curve: Path
    seconds: float
    examples: list[tuple[str, str, str]]  # (source, reference, hypothesis)


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    accel: bool = False,
) -> DemoResult:
    """The demo: train, decode and score the number translator (the command line passes `accel=True`:
    tformer.accel's kernels)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    out = Path(out_dir)
    size = demo_size(quick, seed)
    log(f"[1/5] generating French -> English number words (seed {seed}) ...")
    splits = number_translation(size.n_train, size.n_valid, size.n_test, seed=seed)
    pairs = {k: [(p.src, p.tgt) for p in v] for k, v in splits.items()}
    src_tok = Tokenizer.train([s for s, _ in pairs["train"]], kind="word")
    tgt_tok = Tokenizer.train([t for _, t in pairs["train"]], kind="word")
    log(
        f"      {size.n_train:,} train / {size.n_valid:,} valid / {size.n_test:,} held-out numbers; "
        f"vocabularies {src_tok.vocab_size} fr, {tgt_tok.vocab_size} en"
    )
    model_config = size.model.replace(src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size)
    model = Seq2Seq(model_config)
    if accel:
        from tformer import accel as _accel

        _accel.apply(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"[2/5] training a {model_config.n_layers}+{model_config.decoder_layers}-layer Transformer "
        f"(d_model {model_config.d_model}, {n_params / 1e6:.2f}M parameters) on {torch.get_num_threads()} threads ..."
    )
    task = TranslationTask(model_config, size.train, src_tok, tgt_tok, pairs["train"], pairs["valid"])
    # A fresh demo each time: it replaces its own earlier run there, never another command's files.
    trainer = Trainer(model, task, size.train, out_dir=out, progress=progress, command="demo", rerun=True)
    history = trainer.fit()

    log(f"[3/5] beam search (beam {size.beam_size}) on {size.n_test:,} held-out numbers ...")
    translator = Translator(model.eval(), src_tok, tgt_tok)
    sources = [s for s, _ in pairs["test"]]
    refs = [t for _, t in pairs["test"]]
    hyps = translator.translate(sources, beam_size=size.beam_size)
    em = exact_match(hyps, refs)
    score = bleu(hyps, refs)

    log("[4/5] plots ...")
    example = max(range(len(sources)), key=lambda i: len(sources[i]) if hyps[i] == refs[i] else -1)
    heatmap = _cross_attention_png(translator, sources[example], hyps[example], out / "cross_attention.png")
    curve = loss_curve(history, out / "loss_curve.png", title="tformer demo: fr -> en number words")

    log("[5/5] done")
    checkpoint = trainer.checkpoint_dir
    return DemoResult(
        em,
        score.score,
        score.signature,
        checkpoint,
        heatmap,
        curve,
        time.perf_counter() - start,
        list(zip(sources, refs, hyps, strict=True)),
    )


def _cross_attention_png(translator: Translator, source: str, target: str, path: Path) -> Path:
    """Cross-attention of the last decoder layer, averaged over heads, teacher-forced on `target`."""
    cross = translation_maps(translator, source, target=target).kind("cross")
    weights = cross.layers[-1].mean(0)  # (T, S), T = len(target) + 1 (the last predicts EOS)
    return attention_heatmap(
        weights,
        cross.key_tokens,
        cross.query_tokens,
        path,
        title="cross-attention, last decoder layer (mean of heads)",
    )
