"""Starting a run from pretrained weights, `train.init_from`, for every family: a tformer checkpoint of the
family (a run directory: its best or latest checkpoint; an adapter checkpoint: its base with the adapters
merged) or a Hugging Face directory, `hf:DIR`:

    classification  an 'encoder' checkpoint (`tformer import hf` of a BERT) or a 'classification' one; hf: BERT
    lm              an 'lm' checkpoint; hf: GPT-2
    translation     a 'translation' checkpoint; hf: Marian
    vision          a 'vision' checkpoint; hf: ViT

The source gives the architecture, the tokenizer(s) (vision: the normalisation) and the weights; a
classifier's or a vision model's head is new (initialised as in a fresh model: the run's data give its
classes). From the run's own [model] section only the training-time choices are kept (KEPT: dropout,
attention kernel, max_seq_len where the family has a free one, pooling of a text classifier); every other
architecture value is the source's. A shorter max_seq_len keeps the first rows of learned positions.
`base_of` names the weights a LoRA run adapts (training/lora.py): where they were read and their sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from tformer.config import ClassifierConfig, ConfigError, RunConfig, TransformerConfig, model_config_class
from tformer.data.tokenizers import Tokenizer
from tformer.interop.common import HF_INDEX, HF_WEIGHTS, load_exact

ATTENTION = ("dropout", "attention_dropout", "attention", "attention_window")
KEPT = (*ATTENTION, "pooling", "max_seq_len")  # a text classifier's (the first family init_from served)
TOKENIZER, SRC_TOKENIZER, TGT_TOKENIZER = "tokenizer.json", "src_tokenizer.json", "tgt_tokenizer.json"


@dataclass(frozen=True)
class Sources:
    """What a family's run may start from, and what of the run's [model] section it keeps."""

    tasks: tuple[str, ...]  # tasks of the tformer checkpoints it takes
    hf: str  # the Hugging Face family it takes (interop/hf.py ARCHITECTURES)
    what: str  # for errors: what to give instead
    kept: tuple[str, ...]
    fresh: tuple[str, ...] = ()  # state-dict prefixes of the run's model left as initialised (a new head)


SOURCES = {
    "classification": Sources(
        ("encoder", "classification"),
        "bert",
        "an 'encoder' (from `tformer import hf`) or 'classification' checkpoint, or from hf:DIR",
        KEPT,
        ("head.",),
    ),
    "lm": Sources(
        ("lm",), "gpt2", "an 'lm' checkpoint, or from hf:DIR of a GPT-2", (*ATTENTION, "max_seq_len")
    ),
    "translation": Sources(
        ("translation",),
        "marian",
        "a 'translation' checkpoint, or from hf:DIR of a Marian model",
        (*ATTENTION, "decoder_attention", "cross_attention", "max_seq_len"),
    ),
    "vision": Sources(
        ("vision",), "vit", "a 'vision' checkpoint, or from hf:DIR of a ViT", ATTENTION, ("head.",)
    ),
}


@dataclass
class Start:
    """A run's starting point: the source's architecture, tokenizers and weights (the run model's names)."""

    spec: str  # train.init_from as given
    config: Any  # the source's architecture: the run's family's TransformerConfig subclass
    state: dict[str, Tensor]
    tokenizers: dict[str, Tokenizer]  # checkpoint file name -> tokenizer (vision: none)
    kept: tuple[str, ...] = KEPT
    fresh: tuple[str, ...] = ()
    extra: dict[str, object] = field(default_factory=dict)  # vision: "normalisation"

    @property
    def tokenizer(self) -> Tokenizer:
        """The one tokenizer of a classifier or language model."""
        return self.tokenizers[TOKENIZER]

    def model_config(self, wanted: TransformerConfig, **fixed: object) -> Any:
        """The source's architecture with the run's training-time choices (and `fixed`, e.g. n_classes)."""
        kept = {key: getattr(wanted, key) for key in self.kept}
        n = kept.get("max_seq_len")
        if isinstance(n, int) and n > self.config.max_seq_len and self.config.positions == "learned":
            raise ConfigError(
                f"model.max_seq_len = {n} is longer than the {self.config.max_seq_len} "
                f"positions of train.init_from = {self.spec!r}"
            )
        return self.config.replace(**kept, **fixed)

    def load_into(self, model: nn.Module) -> None:
        """Fill `model` with the source's weights, strictly; the fresh parts (a head) keep their values."""
        own = model.state_dict()
        state = {k: v for k, v in own.items() if k.startswith(self.fresh)}  # () matches nothing
        for key, value in self.state.items():
            if key.endswith("positions.table") and key in own:  # learned positions: the first rows
                value = value[: own[key].shape[0]]
            state[key] = value
        load_exact(model, state, self.spec)

    def build(self, model_config: TransformerConfig) -> nn.Module:
        """The run's model: `model_config` (from `model_config`) with the source's weights."""
        from tformer.models import build_model

        model = build_model(model_config)
        self.load_into(model)
        return model


def run_start(config: RunConfig) -> Start | None:
    """`config.train.init_from`'s start for the run's family (None: the run starts from scratch)."""
    if not config.train.init_from:
        return None
    if config.model.architecture != "transformer":
        raise ConfigError(
            f"train.init_from takes the source's Transformer; model.architecture = "
            f"{config.model.architecture!r} is a baseline (drop it, or drop init_from)"
        )
    return start(config.train.init_from, config.task)


def classifier_start(spec: str) -> Start:
    """`hf:DIR` (a BertModel directory) or a tformer 'encoder' / 'classification' checkpoint directory."""
    return start(spec, "classification")


def start(spec: str, task: str) -> Start:
    """The start of a `task` run from `spec` (hf:DIR or a tformer checkpoint); a source of another family
    is a ConfigError naming what the family starts from."""
    if task not in SOURCES:
        raise ConfigError(f"train.init_from: the {task!r} family has no pretrained start")
    sources = SOURCES[task]
    if spec.startswith("hf:"):
        return _hf_start(spec, task, sources)
    return _checkpoint_start(spec, task, sources)


def _hf_start(spec: str, task: str, sources: Sources) -> Start:
    from tformer.interop.hf import import_hf

    imported = import_hf(spec[3:])
    if imported.family != sources.hf:
        article = "an" if task == "lm" else "a"
        noun = "classifier" if task == "classification" else f"{task} model"
        want = {"bert": "an encoder (BERT)", "gpt2": "a GPT-2", "marian": "a Marian model", "vit": "a ViT"}
        raise ConfigError(
            f"train.init_from = {spec!r}: a {imported.family} model; {article} {noun} starts from "
            f"{want[sources.hf]}"
        )
    state = imported.model.state_dict()
    if imported.family == "bert":  # an Encoder: the classifier's `encoder`
        state = {f"encoder.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(sources.fresh)}
    tokenizers: dict[str, Tokenizer] = {}
    if task != "vision":
        if imported.tokenizer is None:
            raise ConfigError(f"train.init_from = {spec!r}: the directory has no tokenizer.json")
        names = (SRC_TOKENIZER, TGT_TOKENIZER) if task == "translation" else (TOKENIZER,)
        tokenizers = dict.fromkeys(names, imported.tokenizer)
    extra = {"normalisation": imported.extra["normalisation"]} if task == "vision" else {}
    return Start(spec, imported.config, state, tokenizers, sources.kept, sources.fresh, extra)


def _checkpoint_start(spec: str, task: str, sources: Sources) -> Start:
    from tformer.models import build_model
    from tformer.training import run_dir
    from tformer.training.checkpoint import WEIGHTS, load_weights, read_config

    path = run_dir.resolve(spec)  # a run's link (or the run directory): one save's files
    raw = read_config(path)
    kind = raw.get("task")
    if kind not in sources.tasks:
        noun = "a classifier" if task == "classification" else f"a {task!r} run"
        raise ConfigError(
            f"train.init_from = {spec!r}: a {kind!r} checkpoint; {noun} starts from {sources.what}"
        )
    where = str(path / "config.json")
    config_class = ClassifierConfig if kind == "encoder" else model_config_class(str(kind))
    config = config_class.from_dict(raw.get("model", {}), source=where)
    if config.architecture != "transformer":
        raise ConfigError(
            f"train.init_from = {spec!r}: a {config.architecture!r} model; init_from takes a Transformer"
        )
    if kind == "encoder":  # `tformer import hf` of a BERT: the Encoder's own names
        state = {f"encoder.{k}": v for k, v in load_file(str(path / WEIGHTS)).items()}
    else:
        model = build_model(config)
        load_weights(
            path, model
        )  # legacy names mapped; an adapter checkpoint's base with its adapters merged
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(sources.fresh)}
    if kind == "classification":
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    names = {"translation": (SRC_TOKENIZER, TGT_TOKENIZER), "vision": ()}.get(task, (TOKENIZER,))
    tokenizers = {name: Tokenizer.load(path / name) for name in names}
    extra = {"normalisation": raw.get("normalisation")} if task == "vision" else {}
    return Start(spec, config, state, tokenizers, sources.kept, sources.fresh, extra)


def base_of(spec: str) -> tuple[str, str]:
    """The weights `spec` (train.init_from) reads -> (where: hf:ABSOLUTE_DIR or the checkpoint directory it
    resolves to, absolute; the sha256 of its weights file, or of a sharded model's index and shards in
    order)."""
    from tformer.training import run_dir
    from tformer.training.checkpoint import WEIGHTS

    if spec.startswith("hf:"):
        directory = Path(spec[3:]).resolve()
        single = directory / HF_WEIGHTS
        if single.exists():
            files = [single]
        else:
            from tformer.interop.common import _shards

            files = [directory / HF_INDEX, *_shards(directory, directory / HF_INDEX)]
        return f"hf:{directory}", sha256_files(files)
    path = run_dir.resolve(spec).resolve()
    return str(path), sha256_files([path / WEIGHTS])


def sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
