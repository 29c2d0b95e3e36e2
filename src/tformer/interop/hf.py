"""Hugging Face model directories in and out: `tformer import hf DIR OUT`, `tformer export hf CKPT OUT`.

In: GPT2LMHeadModel -> a language-model checkpoint; MarianMTModel -> a translation checkpoint;
ViTForImageClassification -> a vision checkpoint (class names and normalisation, no tokenizer); BertModel
-> an encoder checkpoint (task "encoder": a classifier starts from it with `train.init_from`). Out: a
language model -> GPT2LMHeadModel. The directory's tokenizer.json becomes the checkpoint's tokenizer with
its own ids; the roles tformer needs (pad, bos, eos, unk) are taken from config.json's token ids and the
tokenizer's declared special tokens, and saved beside it (data/tokenizers.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from tformer.config import ClassifierConfig, LMConfig, Seq2SeqConfig, VisionConfig
from tformer.data.tokenizers import Tokenizer
from tformer.interop import bert, gpt2, marian, vit
from tformer.interop.common import (
    HF_CONFIG,
    HF_TOKENIZER,
    HF_WEIGHTS,
    HFConfig,
    InteropError,
    Tensors,
    load_exact,
    read_hf_config,
    read_hf_tensors,
)
from tformer.models.encoder import Encoder
from tformer.models.lm import LanguageModel
from tformer.models.seq2seq import Seq2Seq
from tformer.models.vit import VisionTransformer

# architecture name in config.json -> (family, tformer task of the checkpoint it becomes)
ARCHITECTURES = {
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "BertModel": ("bert", "encoder"),
    "MarianMTModel": ("marian", "translation"),
    "ViTForImageClassification": ("vit", "vision"),
}
MODEL_TYPES = {
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
    "marian": "MarianMTModel",
    "vit": "ViTForImageClassification",
}


@dataclass
class Imported:
    """A Hugging Face model as a tformer module, with its tokenizer (None when the directory has none)."""

    family: str
    task: str  # "lm", "translation", "vision" or "encoder"
    config: LMConfig | Seq2SeqConfig | ClassifierConfig | VisionConfig
    model: nn.Module  # LanguageModel, Seq2Seq, VisionTransformer or Encoder
    tokenizer: Tokenizer | None  # (vision: None, none needed)
    source: Path
    ignored: dict[str, str] = field(default_factory=dict)  # HF tensor -> why it has no tformer counterpart
    extra: dict[str, object] = field(default_factory=dict)  # config.json's other entries (vision: classes)


def architecture(cfg: HFConfig) -> str:
    archs = cfg.get("architectures")
    supported = ", ".join(ARCHITECTURES)
    if archs:
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise InteropError(
                f"{cfg.path}: architectures = {archs!r} is not supported; tformer imports {supported}"
            )
        return archs[0]
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise InteropError(
            f"{cfg.path}: model_type = {model_type!r} is not supported; tformer imports {supported}"
        )
    return MODEL_TYPES[model_type]


def import_hf(directory: str | Path) -> Imported:
    """Read a Hugging Face model directory into the matching tformer model, every tensor accounted for."""
    cfg = read_hf_config(directory)
    arch = architecture(cfg)
    family, task = ARCHITECTURES[arch]
    tensors = Tensors(read_hf_tensors(cfg.directory), str(cfg.directory / HF_WEIGHTS))
    model: nn.Module
    if family == "gpt2":
        config: Any = gpt2.lm_config(cfg)
        model = LanguageModel(config)
        state = gpt2.lm_state(tensors, config)
    elif family == "bert":
        config = bert.encoder_config(cfg)
        model = Encoder(config, config.vocab_size)
        state = bert.encoder_state(tensors, config)
    elif family == "vit":
        config = vit.vision_config(cfg)
        model = VisionTransformer(config)
        state = vit.vision_state(tensors, config)
        extra: dict[str, object] = {
            "classes": vit.class_names(cfg),
            "normalisation": vit.normalisation(cfg, config.channels).to_dict(),
        }
    else:
        config = marian.seq2seq_config(cfg)
        model = Seq2Seq(config)
        state = marian.seq2seq_state(tensors, config)
    tensors.finish()
    load_exact(model, state, tensors.source)
    if family == "vit":  # images: no tokenizer
        return Imported(family, task, config, model.eval(), None, cfg.directory, tensors.ignored, extra)
    tokenizer = import_tokenizer(cfg, family, config)
    return Imported(family, task, config, model.eval(), tokenizer, cfg.directory, tensors.ignored)


def _declared_tokens(directory: Path) -> dict[str, str]:
    """Special-token strings a model directory declares (tokenizer_config.json, special_tokens_map.json)."""
    out: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InteropError(f"{path}: not valid JSON ({exc})") from None
        for key, value in data.items() if isinstance(data, dict) else ():
            if key.endswith("_token") and isinstance(value, dict):
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str):
                out[key] = value
    return out


def import_tokenizer(cfg: HFConfig, family: str, config: Any) -> Tokenizer | None:
    """DIR/tokenizer.json with each of tformer's roles mapped to one of its ids (None: no such file).

    gpt2: bos/eos from config.json, pad = pad_token_id or eos, unk = unk_token or eos (byte-level BPE
    never needs one). bert: pad from config.json, bos = [CLS], eos = [SEP], unk = [UNK] (or the names the
    directory declares). marian: pad, eos and decoder_start_token_id (as bos) from config.json, unk <unk>."""
    path = cfg.directory / HF_TOKENIZER
    if not path.exists():
        return None
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise InteropError(f"{path}: not a valid tokenizer file ({exc})") from None
    # tformer's batching pads and cuts: a file that pads every text to 128 tokens (all-MiniLM-L6-v2's does)
    # or truncates would change what `encode` returns
    hf.no_padding()
    hf.no_truncation()
    vocab = config.vocab_size if hasattr(config, "vocab_size") else config.tgt_vocab_size
    if hf.get_vocab_size() > vocab:
        raise InteropError(
            f"{path}: {hf.get_vocab_size()} tokens, more than the model's vocab_size = {vocab} in {cfg.path}"
        )
    declared = _declared_tokens(cfg.directory)

    def named(key: str, default: str | None) -> int | None:
        token = declared.get(key, default)
        if token is None:
            return None
        i = hf.token_to_id(token)
        if i is None:
            raise InteropError(f"{path}: {key} {token!r} is not in the vocabulary")
        return i

    roles: dict[str, int | None]
    if family == "gpt2":
        eos = cfg.token_id("eos_token_id", vocab)
        unk = named("unk_token", None)
        roles = {
            "pad": config.pad_id,
            "bos": cfg.token_id("bos_token_id", vocab),
            "eos": eos,
            "unk": eos if unk is None else unk,
        }
    elif family == "bert":
        roles = {
            "pad": config.pad_id,
            "bos": named("cls_token", "[CLS]"),
            "eos": named("sep_token", "[SEP]"),
            "unk": named("unk_token", "[UNK]"),
        }
    else:
        roles = {
            "pad": config.pad_id,
            "bos": cfg.token_id("decoder_start_token_id", vocab),
            "eos": cfg.token_id("eos_token_id", vocab),
            "unk": named("unk_token", "<unk>"),
        }
    specials = {role: i for role, i in roles.items() if i is not None}
    return Tokenizer(hf, specials)


def save_imported(imported: Imported, out: str | Path) -> Path:
    """Write an imported model as a tformer checkpoint directory (config.json, weights, tokenizer files)."""
    from tformer.training.checkpoint import save_checkpoint

    tok = imported.tokenizer
    if tok is None and imported.task != "vision":
        raise InteropError(
            f"{imported.source}: {HF_TOKENIZER} is missing; a tformer checkpoint needs the tokenizer "
            "(a Hugging Face `tokenizers` file; sentencepiece .spm files are not read)"
        )

    def write_tokenizers(directory: Path) -> None:
        if tok is None:  # vision: everything is in config.json
            return
        names = (
            ["src_tokenizer.json", "tgt_tokenizer.json"]
            if imported.task == "translation"
            else ["tokenizer.json"]
        )
        for name in names:
            tok.save(directory / name)

    config = {
        "task": imported.task,
        "model": imported.config.to_dict(),
        **imported.extra,
        "imported_from": {
            "format": "huggingface",
            "family": imported.family,
            "directory": str(imported.source),
            "ignored_tensors": imported.ignored,
        },
    }
    return save_checkpoint(out, model=imported.model, config=config, write_extra=write_tokenizers)


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """A tformer language-model checkpoint -> a GPT2LMHeadModel directory transformers loads."""
    from tformer.tasks.common import read_task_config
    from tformer.training import run_dir
    from tformer.training.checkpoint import load_weights, read_config

    checkpoint, out = run_dir.resolve(checkpoint), Path(out)  # a live run's link: one save's files
    task = read_config(checkpoint).get("task")
    if task != "lm":
        raise InteropError(
            f"{checkpoint}: a {task!r} checkpoint; `export hf` writes GPT-2 (GPT2LMHeadModel) from a "
            "language model ('lm') checkpoint"
        )
    _, config = read_task_config(checkpoint, "lm")
    gpt2.check_exportable(config, str(checkpoint / "config.json"))
    model = LanguageModel(config)
    load_weights(checkpoint, model)
    tok = Tokenizer.load(checkpoint / "tokenizer.json")
    out.mkdir(parents=True, exist_ok=True)
    hf_config = gpt2.gpt2_config(config, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    (out / HF_CONFIG).write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    save_file(gpt2.gpt2_state(model), str(out / HF_WEIGHTS), metadata={"format": "pt"})
    (out / HF_TOKENIZER).write_text(tok.to_str(), encoding="utf-8")
    names = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.pad_id}
    tok_config = {f"{role}_token": tok.id_to_token(i) for role, i in names.items()}
    tok_config |= {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_seq_len}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    return out
