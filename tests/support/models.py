"""Small models and tasks of the three families with real tokenizers: untrained ones for the visualisation
and thread tests, `build` for the distributed and export tests.

Untrained is enough: the tests check that the maps are the models' true attention weights (against
torch.nn.MultiheadAttention on the same inputs) and that they are drawn faithfully, not what was learned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.config import ClassifierConfig, LMConfig, ModelConfig, TrainConfig
from tformer.data.synthetic import number_translation
from tformer.data.tokenizers import Tokenizer
from tformer.models import Classifier, LanguageModel
from tformer.models.seq2seq import Seq2Seq
from tformer.tasks import (
    ClassificationTask,
    LanguageModelTask,
    TextClassifier,
    TextGenerator,
    TranslationTask,
    Translator,
)
from tformer.tasks.translation import SRC_TOKENIZER, TGT_TOKENIZER
from tformer.training.checkpoint import save_checkpoint

FRENCH = [
    "le chat noir dort sur le tapis rouge",
    "un chien blanc court dans le jardin",
    "la maison est grande",
]
ENGLISH = ["the black cat sleeps on the red carpet", "a white dog runs in the garden", "the house is big"]
# Labelled sentences for the classifier's tests.
TEXTS = [
    ("a wonderful and moving film", "pos"),
    ("dull , slow and far too long", "neg"),
    ("the best acting of the year", "pos"),
    ("a tedious mess of a plot", "neg"),
    ("funny , warm and clever", "pos"),
    ("i wanted my two hours back", "neg"),
    ("beautifully shot and well told", "pos"),
    ("the jokes never land", "neg"),
]
SMALL = {"d_model": 32, "n_heads": 4, "d_ff": 64, "n_layers": 2, "dropout": 0.0, "max_seq_len": 24}


def translator(seed: int = 0, **overrides: object) -> Translator:
    torch.manual_seed(seed)
    src_tok, tgt_tok = Tokenizer.train(FRENCH, kind="word"), Tokenizer.train(ENGLISH, kind="word")
    config = ModelConfig(
        **{**SMALL, **overrides}, src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size
    )
    return Translator(Seq2Seq(config).eval(), src_tok, tgt_tok)


def classifier(seed: int = 0, **overrides: object) -> TextClassifier:
    torch.manual_seed(seed)
    tok = Tokenizer.train(ENGLISH, kind="word")
    config = ClassifierConfig(**{**SMALL, **overrides}, vocab_size=tok.vocab_size, n_classes=2)
    return TextClassifier(Classifier(config).eval(), tok, ["neg", "pos"])


def generator(seed: int = 0) -> TextGenerator:
    torch.manual_seed(seed)
    tok = Tokenizer.train(ENGLISH, kind="char")
    config = LMConfig(**SMALL, vocab_size=tok.vocab_size)
    return TextGenerator(LanguageModel(config).eval(), tok)


def save_translator(t: Translator, path: Path) -> Path:
    def tokenizers(d: Path) -> None:
        t.src_tok.save(d / SRC_TOKENIZER)
        t.tgt_tok.save(d / TGT_TOKENIZER)

    config = {"task": "translation", "model": t.model.config.to_dict()}
    return save_checkpoint(path, model=t.model, config=config, write_extra=tokenizers)


def save_classifier(c: TextClassifier, path: Path) -> Path:
    config = {"task": "classification", "model": c.model.config.to_dict(), "labels": c.labels}
    return save_checkpoint(
        path, model=c.model, config=config, write_extra=lambda d: c.tok.save(d / "tokenizer.json")
    )


def save_generator(g: TextGenerator, path: Path) -> Path:
    config = {"task": "lm", "model": g.model.config.to_dict()}
    return save_checkpoint(
        path, model=g.model, config=config, write_extra=lambda d: g.tok.save(d / "tokenizer.json")
    )


TEXT = "to be or not to be, that is the question: whether tis nobler in the mind to suffer. " * 12
REVIEWS = TEXTS * 3


def build(family: str, *, dropout: float = 0.0, **train_kw):
    """A tiny task and model of `family`, the same in every process (fixed seeds, no dropout by default)."""
    defaults: dict[str, object] = dict(
        epochs=100,
        lr=1e-3,
        warmup_steps=0,
        schedule="constant",
        log_every=2,
        eval_every_epochs=100,
        label_smoothing=0.1,
        seed=3,
        eps=1e-6,  # see the module docstring
    )
    tc = TrainConfig(**{**defaults, **train_kw})  # train_kw may override the defaults
    small = dict(d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=dropout)
    torch.manual_seed(11)
    if family == "lm":
        tok = Tokenizer.train([TEXT], kind="char")
        mc = LMConfig(vocab_size=tok.vocab_size, max_seq_len=16, **small)
        return LanguageModelTask(mc, tc, tok, TEXT, TEXT[:200]), LanguageModel(mc)
    if family == "classification":
        tok = Tokenizer.train([t for t, _ in REVIEWS], kind="word")
        mc = ClassifierConfig(vocab_size=tok.vocab_size, n_classes=2, max_seq_len=16, **small)
        return ClassificationTask(mc, tc, tok, ["neg", "pos"], REVIEWS, REVIEWS[:8]), Classifier(mc)
    splits = number_translation(120, 10, 0, seed=1, max_digits=3)
    pairs = {k: [(p.src, p.tgt) for p in v] for k, v in splits.items()}
    src_tok = Tokenizer.train([s for s, _ in pairs["train"]], kind="word")
    tgt_tok = Tokenizer.train([t for _, t in pairs["train"]], kind="word")
    mc = ModelConfig(
        src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size, max_seq_len=24, **small
    )
    task = TranslationTask(mc, tc, src_tok, tgt_tok, pairs["train"], pairs["valid"], eval_max_sentences=2)
    return task, Seq2Seq(mc)
