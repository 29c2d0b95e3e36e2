"""The model families (translation, classification, lm, vision): one `Family` entry each, the one place that says
which config class, models, task builder, predictor, evaluation and command-line verbs a family has.

`tformer.config` (task names, the [model] class, architectures), `tformer.models.build_model`,
`tformer.pipeline` (training and `evaluate_checkpoint`), `tformer.tasks.load_predictor` and the CLI all
read this table, so adding a family is one `register(Family(...))` here plus the family's own files.

Torch-free: everything but names is given by import path ("module:symbol") and imported when first
used, so `import tformer.config` (which reads this module) loads no torch.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tformer.families.roles import CommandAdder, Evaluator, ModelBuilder, PredictorClass, TaskBuilder

if TYPE_CHECKING:
    from tformer.config import TransformerConfig


@dataclass(frozen=True)
class Family:
    """One model family. Every "module:symbol" is imported on use; `roles.py` says what each must be."""

    name: str  # config.json's "task", `tformer train NAME`
    config: str  # the [model] section's config class (a TransformerConfig)
    models: dict[str, str]  # model.architecture -> ModelBuilder (a class called with the config)
    build: str  # TaskBuilder: (RunConfig, checkpoint being resumed | None) -> (task, model)
    predictor: str  # PredictorClass: `.load(checkpoint, ...)` -> the predictor
    evaluate: str  # Evaluator: `tformer eval`'s metrics of a checkpoint on files
    commands: str  # CommandAdder: adds the family's own CLI verbs (e.g. `translate`)
    verbs: tuple[str, ...]  # the names those verbs have (for --help and the tests)
    train_data: str  # what `tformer train NAME --train` takes, for its --help

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.models)

    def config_class(self) -> type[TransformerConfig]:
        from tformer.config import TransformerConfig

        cls = resolve(self.config)
        if not (isinstance(cls, type) and issubclass(cls, TransformerConfig)):
            raise TypeError(f"family {self.name!r}: {self.config} is not a TransformerConfig subclass")
        return cls

    def model_builder(self, architecture: str) -> ModelBuilder:
        if architecture not in self.models:
            raise ValueError(
                f"family {self.name!r} has no architecture {architecture!r}; "
                f"choose one of {', '.join(self.models)}"
            )
        builder = resolve(self.models[architecture])
        if not isinstance(builder, ModelBuilder):
            raise TypeError(f"family {self.name!r}: {self.models[architecture]} is not callable")
        return builder

    def task_builder(self) -> TaskBuilder:
        builder = resolve(self.build)
        if not isinstance(builder, TaskBuilder):
            raise TypeError(f"family {self.name!r}: {self.build} is not callable")
        return builder

    def predictor_class(self) -> PredictorClass:
        cls = resolve(self.predictor)
        if not isinstance(cls, PredictorClass):
            raise TypeError(f"family {self.name!r}: {self.predictor} has no load(path, ...)")
        return cls

    def evaluator(self) -> Evaluator:
        fn = resolve(self.evaluate)
        if not isinstance(fn, Evaluator):
            raise TypeError(f"family {self.name!r}: {self.evaluate} is not callable")
        return fn

    def command_adder(self) -> CommandAdder:
        fn = resolve(self.commands)
        if not isinstance(fn, CommandAdder):
            raise TypeError(f"family {self.name!r}: {self.commands} is not callable")
        return fn


def resolve(path: str) -> object:
    """ "package.module:symbol" -> that object (the module imported on first use)."""
    module, sep, symbol = path.partition(":")
    if not sep or not module or not symbol:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:symbol'")
    return getattr(importlib.import_module(module), symbol)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (its name must be new); returned, so a test can register and `unregister` a toy one."""
    if family.name in FAMILIES:
        raise ValueError(f"a family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    del FAMILIES[name]


def names() -> tuple[str, ...]:
    """The families' names in registration order: `task` values, `tformer train` choices."""
    return tuple(FAMILIES)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def for_config(cls: type) -> Family | None:
    """The family whose [model] class is exactly `cls`. Imports nothing: a family whose path names a module
    not loaded yet cannot be `cls`'s. The path may name the class where it is re-exported (tformer.config
    for tformer.config.model's classes) or by an alias (ModelConfig for Seq2SeqConfig)."""
    for family in FAMILIES.values():
        module, _, symbol = family.config.partition(":")
        if getattr(sys.modules.get(module), symbol, None) is cls:
            return family
    return None


_BASELINES = "tformer.models.rnn"
register(
    Family(
        name="translation",
        config="tformer.config:Seq2SeqConfig",
        models={
            "transformer": "tformer.models.seq2seq:Seq2Seq",
            "lstm": f"{_BASELINES}:RNNSeq2Seq",
            "gru": f"{_BASELINES}:RNNSeq2Seq",
        },
        build="tformer.tasks.translation:build",
        predictor="tformer.tasks.translation:Translator",
        evaluate="tformer.tasks.translation:evaluate_files",
        commands="tformer.families.commands:add_translate",
        verbs=("translate",),
        train_data="a TSV or SOURCE TARGET files",
    )
)
register(
    Family(
        name="classification",
        config="tformer.config:ClassifierConfig",
        models={
            "transformer": "tformer.models.classifier:Classifier",
            "cnn": "tformer.models.cnn:CNNClassifier",
            "lstm": f"{_BASELINES}:RNNClassifier",
            "gru": f"{_BASELINES}:RNNClassifier",
        },
        build="tformer.tasks.classification:build",
        predictor="tformer.tasks.classification:TextClassifier",
        evaluate="tformer.tasks.classification:evaluate_files",
        commands="tformer.families.commands:add_classify",
        verbs=("classify",),
        train_data="a CSV/TSV/JSONL",
    )
)
register(
    Family(
        name="lm",
        config="tformer.config:LMConfig",
        models={
            "transformer": "tformer.models.lm:LanguageModel",
            "lstm": f"{_BASELINES}:RNNLanguageModel",
            "gru": f"{_BASELINES}:RNNLanguageModel",
        },
        build="tformer.tasks.lm:build",
        predictor="tformer.tasks.lm:TextGenerator",
        evaluate="tformer.tasks.lm:evaluate_files",
        commands="tformer.families.commands:add_generate",
        verbs=("generate",),
        train_data="a text file",
    )
)
register(
    Family(
        name="vision",
        config="tformer.config:VisionConfig",
        models={
            "transformer": "tformer.models.vit:VisionTransformer",
            "cnn": "tformer.models.image_cnn:ImageCNN",
        },
        build="tformer.tasks.vision:build",
        predictor="tformer.tasks.vision:ImageClassifier",
        evaluate="tformer.tasks.vision:evaluate_files",
        commands="tformer.families.commands:add_classify",  # the one `classify`, text or images
        verbs=("classify",),
        train_data="IDX images + labels files, an image folder (a subfolder per class) or a .npz",
    )
)
