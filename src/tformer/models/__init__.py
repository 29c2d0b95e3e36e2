"""Models built from tformer's layers: encoder-decoder, classifier, decoder-only language model, and the
literature's baselines (LSTM / GRU with additive attention, LSTM / GRU language model and classifier, CNN classifier)."""

from __future__ import annotations

from typing import Any

from torch import nn

from tformer.models.classifier import Classifier, ClassifierOutput
from tformer.models.lm import LanguageModel, LMCache, LMOutput
from tformer.models.seq2seq import DecoderCache, Seq2Seq, Seq2SeqOutput


def build_model(config: Any) -> nn.Module:
    """The model a family config asks for (`config.architecture`): the Transformer or a baseline."""
    from tformer.config import ClassifierConfig, LMConfig, ModelConfig

    arch = config.architecture
    if isinstance(config, ClassifierConfig):
        if arch == "cnn":
            from tformer.models.cnn import CNNClassifier

            return CNNClassifier(config)
        if arch in ("lstm", "gru"):
            from tformer.models.rnn import RNNClassifier

            return RNNClassifier(config)
        return Classifier(config)
    if isinstance(config, LMConfig):
        if arch in ("lstm", "gru"):
            from tformer.models.rnn import RNNLanguageModel

            return RNNLanguageModel(config)
        return LanguageModel(config)
    if isinstance(config, ModelConfig):
        if arch in ("lstm", "gru"):
            from tformer.models.rnn import RNNSeq2Seq

            return RNNSeq2Seq(config)
        return Seq2Seq(config)
    raise TypeError(f"no model for a {type(config).__name__}")


__all__ = [
    "Classifier",
    "ClassifierOutput",
    "DecoderCache",
    "LMCache",
    "LMOutput",
    "LanguageModel",
    "Seq2Seq",
    "Seq2SeqOutput",
    "build_model",
]
