"""tformer: the Transformer of "Attention Is All You Need", exact, trainable and decodable on your data.

The public API, imported lazily so that `tformer.config` (and this package) load without torch:

    from tformer import Seq2Seq, Seq2SeqConfig, Translator
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "ModelConfig": "tformer.config",  # the deprecated name of Seq2SeqConfig
    "Seq2SeqConfig": "tformer.config",
    "ClassifierConfig": "tformer.config",
    "LMConfig": "tformer.config",
    "DataConfig": "tformer.config",
    "TrainConfig": "tformer.config",
    "RunConfig": "tformer.config",
    "ConfigError": "tformer.config",
    "load_toml": "tformer.config",
    "MultiHeadAttention": "tformer.attention",
    "Seq2Seq": "tformer.models",
    "Classifier": "tformer.models",
    "LanguageModel": "tformer.models",
    "Encoder": "tformer.models",
    "Decoder": "tformer.models",
    "TransformerStack": "tformer.models",
    "TextClassifier": "tformer.tasks",
    "TextGenerator": "tformer.tasks",
    "load_predictor": "tformer.tasks",
    "train": "tformer.pipeline",
    "evaluate_checkpoint": "tformer.pipeline",
    "generate": "tformer.inference.sampling",
    "Tokenizer": "tformer.data.tokenizers",
    "TranslationTask": "tformer.tasks",
    "Translator": "tformer.tasks",
    "Trainer": "tformer.training",
    "CheckpointError": "tformer.training",
    "greedy_decode": "tformer.inference",
    "beam_search": "tformer.inference",
    "apply_precision": "tformer.inference",
    "run_demo": "tformer.demo",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
