"""Starting a classifier from pretrained weights: `train.init_from = "hf:DIR"` or a tformer checkpoint.

The source gives the architecture, the tokenizer and the encoder's weights; the classification head is new
(initialised as in a fresh model). From the run's own [model] section only the training-time choices are
kept (KEPT: dropout, attention_dropout, attention, attention_window, pooling, max_seq_len); every other
architecture value is the source's. A shorter max_seq_len keeps the first rows of learned positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from safetensors.torch import load_file
from torch import Tensor

from tformer.config import ClassifierConfig, ConfigError
from tformer.data.tokenizers import Tokenizer
from tformer.interop.common import load_exact
from tformer.interop.hf import import_hf
from tformer.models.classifier import Classifier

KEPT = ("dropout", "attention_dropout", "attention", "attention_window", "pooling", "max_seq_len")


@dataclass
class ClassifierStart:
    tokenizer: Tokenizer
    config: ClassifierConfig  # the source's architecture
    encoder_state: dict[str, Tensor]  # Encoder state dict (no "encoder." prefix)
    source: str

    def model_config(self, wanted: ClassifierConfig, *, n_classes: int) -> ClassifierConfig:
        """The source's architecture with the run's training-time choices and class count."""
        kept = {key: getattr(wanted, key) for key in KEPT}
        if kept["max_seq_len"] > self.config.max_seq_len:
            raise ConfigError(
                f"model.max_seq_len = {kept['max_seq_len']} is longer than the {self.config.max_seq_len} "
                f"positions of train.init_from = {self.source!r}"
            )
        return self.config.replace(**kept, n_classes=n_classes)

    def load_into(self, model: Classifier) -> None:
        """Fill the classifier's encoder, strictly; the head keeps its fresh initialisation."""
        state = dict(self.encoder_state)
        if model.config.positions == "learned":
            state["positions.table"] = state["positions.table"][: model.config.max_seq_len]
        load_exact(model.encoder, state, self.source)


def classifier_start(spec: str) -> ClassifierStart:
    """`hf:DIR` (a BertModel directory) or a tformer 'encoder' / 'classification' checkpoint directory."""
    from tformer.training.checkpoint import WEIGHTS, read_config

    if spec.startswith("hf:"):
        imported = import_hf(spec[3:])
        if imported.task != "encoder":
            raise ConfigError(
                f"train.init_from = {spec!r}: a {imported.family} model; a classifier starts from an encoder (BERT)"
            )
        if imported.tokenizer is None:
            raise ConfigError(f"train.init_from = {spec!r}: the directory has no tokenizer.json")
        assert isinstance(imported.config, ClassifierConfig)
        return ClassifierStart(imported.tokenizer, imported.config, imported.model.state_dict(), spec)
    from tformer.training import run_dir

    path = run_dir.resolve(spec)  # a run's link (or the run directory): one save's files
    raw = read_config(path)
    task = raw.get("task")
    if task not in ("encoder", "classification"):
        raise ConfigError(
            f"train.init_from = {spec!r}: a {task!r} checkpoint; a classifier starts from an 'encoder' "
            "(from `tformer import hf`) or 'classification' checkpoint, or from hf:DIR"
        )
    config = ClassifierConfig.from_dict(raw.get("model", {}), source=str(path / "config.json"))
    weights = load_file(str(path / WEIGHTS))
    if task == "classification":
        weights = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    return ClassifierStart(Tokenizer.load(path / "tokenizer.json"), config, weights, spec)
