"""Models built from tformer's layers: encoder-decoder, classifier, decoder-only language model, and the
literature's baselines (LSTM / GRU with additive attention, LSTM / GRU language model and classifier, CNN classifier)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from tformer.models.classifier import Classifier, ClassifierOutput
from tformer.models.decoder import Decoder, DecoderCache
from tformer.models.encoder import Encoder
from tformer.models.lm import LanguageModel, LMCache, LMOutput
from tformer.models.seq2seq import Seq2Seq, Seq2SeqOutput
from tformer.models.stack import TransformerStack

if TYPE_CHECKING:
    from tformer.config import TransformerConfig


def build_model(config: TransformerConfig) -> nn.Module:
    """The model a family config asks for: its family (tformer.families) maps `config.architecture` to a
    class, the Transformer or a baseline."""
    from tformer import families

    family = families.for_config(type(config))
    if family is None:
        raise TypeError(f"no model for a {type(config).__name__}: no family in tformer.families has it")
    return family.model_builder(config.architecture)(config)


__all__ = [
    "Classifier",
    "ClassifierOutput",
    "Decoder",
    "DecoderCache",
    "Encoder",
    "LMCache",
    "LMOutput",
    "LanguageModel",
    "Seq2Seq",
    "Seq2SeqOutput",
    "TransformerStack",
    "build_model",
]
