"""Small untrained models of the three families with real tokenizers, for the visualisation tests.

Untrained is enough: the tests check that the maps are the models' true attention weights (against
torch.nn.MultiheadAttention on the same inputs) and that they are drawn faithfully, not what was learned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.config import ClassifierConfig, LMConfig, ModelConfig
from tformer.data.tokenizers import Tokenizer
from tformer.models import Classifier, LanguageModel
from tformer.models.seq2seq import Seq2Seq
from tformer.tasks import TextClassifier, TextGenerator, Translator
from tformer.tasks.translation import SRC_TOKENIZER, TGT_TOKENIZER
from tformer.training.checkpoint import save_checkpoint

FRENCH = [
    "le chat noir dort sur le tapis rouge",
    "un chien blanc court dans le jardin",
    "la maison est grande",
]
ENGLISH = ["the black cat sleeps on the red carpet", "a white dog runs in the garden", "the house is big"]
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
