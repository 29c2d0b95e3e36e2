"""Configuration as frozen, validated data. Imports no torch.

Every run is reproduced from its saved config and seed. Unknown keys are errors that name the closest
valid key; values are checked on construction so a bad config fails before any tensor is made.

    base.py     ConfigError, the value checks, Section (from_dict / to_dict / replace)
    model.py    the [model] section: TransformerConfig and the families' Seq2SeqConfig (ModelConfig),
                ClassifierConfig, LMConfig
    run.py      the [train] and [data] sections, RunConfig (a whole run), model_config_class
    vision.py   the vision family's VisionConfig (ViT; architecture "cnn": the convolutional baseline)
    loading.py  load_toml, apply_overrides (`key=value` from the command line)

Every name is imported from here (`from tformer.config import LMConfig`), as saved configs and users do.
"""

from tformer.config.base import INT64, ConfigError, Section
from tformer.config.loading import apply_overrides, load_toml
from tformer.config.model import (
    ACTIVATIONS,
    ATTENTION_BACKENDS,
    ATTENTION_SCORES,
    POOLINGS,
    POSITIONS,
    SCORE_BACKENDS,
    ClassifierConfig,
    LMConfig,
    ModelConfig,
    Seq2SeqConfig,
    TransformerConfig,
)
from tformer.config.run import (
    SCHEDULES,
    TASKS,
    TOKENIZERS,
    DataConfig,
    RunConfig,
    TrainConfig,
    model_config_class,
)
from tformer.config.vision import VisionConfig

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_BACKENDS",
    "ATTENTION_SCORES",
    "INT64",
    "POOLINGS",
    "POSITIONS",
    "SCHEDULES",
    "SCORE_BACKENDS",
    "TASKS",
    "TOKENIZERS",
    "ClassifierConfig",
    "ConfigError",
    "DataConfig",
    "LMConfig",
    "ModelConfig",
    "RunConfig",
    "Section",
    "Seq2SeqConfig",
    "TrainConfig",
    "TransformerConfig",
    "VisionConfig",
    "apply_overrides",
    "load_toml",
    "model_config_class",
]
