"""Models built from tformer's layers: encoder-decoder, classifier, decoder-only language model."""

from tformer.models.classifier import Classifier, ClassifierOutput
from tformer.models.lm import LanguageModel, LMCache, LMOutput
from tformer.models.seq2seq import DecoderCache, Seq2Seq, Seq2SeqOutput

__all__ = [
    "Classifier",
    "ClassifierOutput",
    "DecoderCache",
    "LMCache",
    "LMOutput",
    "LanguageModel",
    "Seq2Seq",
    "Seq2SeqOutput",
]
