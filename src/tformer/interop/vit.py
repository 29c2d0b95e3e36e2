"""Hugging Face `ViTForImageClassification` -> tformer's VisionTransformer (the vision family).

HF's ViT is tformer's pre-norm ViT exactly: a strided-convolution patch embedding, a [CLS] token, learned
positions over [CLS] + patches, pre-norm layers (layernorm_before / layernorm_after) with exact (erf) GELU,
a final LayerNorm (eps `layer_norm_eps`, 1e-12 by default) and a linear classifier on the [CLS] state.
Its normalisation is the image processor's (preprocessor_config.json's image_mean / image_std after
rescaling to [0, 1]; HF's ViT defaults 0.5 / 0.5 when the file is absent); the class names come from
config.json's id2label.
"""

from __future__ import annotations

import json

from torch import Tensor

from tformer.config import ConfigError, VisionConfig
from tformer.data.transforms import Normalisation
from tformer.interop.common import HFConfig, Tensors, bert_style_layer, linear, prefixed

PREPROCESSOR = "preprocessor_config.json"
HF_DEFAULT_MEAN_STD = 0.5  # ViTImageProcessor's IMAGENET_STANDARD_MEAN / _STD


def vision_config(cfg: HFConfig) -> VisionConfig:
    """config.json of a ViTForImageClassification -> the VisionConfig of the same model."""
    cfg.expect("qkv_bias", True, True, "tformer's attention has biases on all of q, k, v or none")
    labels = class_names(cfg)
    return VisionConfig(
        image_size=cfg.need("image_size"),
        patch_size=cfg.need("patch_size"),
        channels=cfg.need("num_channels"),
        n_classes=len(labels),
        pooling="cls",
        patch_embedding="conv",
        d_model=cfg.need("hidden_size"),
        n_heads=cfg.need("num_attention_heads"),
        d_ff=cfg.need("intermediate_size"),
        n_layers=cfg.need("num_hidden_layers"),
        dropout=float(cfg.get("hidden_dropout_prob", 0.0)),
        attention_dropout=float(cfg.get("attention_probs_dropout_prob", 0.0)),
        norm_first=True,
        final_norm=True,
        activation=cfg.activation("hidden_act", "gelu"),
        positions="learned",
        bias=True,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
    )


def class_names(cfg: HFConfig) -> list[str]:
    """id2label's names in id order (ids 0..K-1, every one named)."""
    raw = cfg.get("id2label")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{cfg.path}: field 'id2label' is missing or empty; expected the class names by id")
    try:
        by_id = {int(k): v for k, v in raw.items()}
    except ValueError:
        raise ConfigError(f"{cfg.path}: id2label keys {sorted(raw)} are not integer ids") from None
    if sorted(by_id) != list(range(len(by_id))) or not all(isinstance(v, str) for v in by_id.values()):
        raise ConfigError(f"{cfg.path}: id2label = {raw!r}; expected names for ids 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def normalisation(cfg: HFConfig, channels: int) -> Normalisation:
    """The image processor's mean / std (after rescaling to [0, 1]), or HF ViT's defaults."""
    path = cfg.directory / PREPROCESSOR
    mean = std = [HF_DEFAULT_MEAN_STD] * channels
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if data.get("do_rescale", True) is False or data.get("do_normalize", True) is False:
            raise ConfigError(f"{path}: do_rescale / do_normalize off cannot be mapped; tformer does both")
        mean, std = data.get("image_mean", mean), data.get("image_std", std)
    try:
        norm = Normalisation.from_dict({"mean": mean, "std": std}, str(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if len(norm.mean) != channels:
        raise ConfigError(
            f"{path}: image_mean has {len(norm.mean)} values; the model has {channels} channels"
        )
    return norm


def vision_state(t: Tensors, c: VisionConfig) -> dict[str, Tensor]:
    """ViTForImageClassification's tensors -> a VisionTransformer's state dict."""
    d, f, p = c.d_model, c.d_ff, c.patch_size
    e = "vit.embeddings"
    state = {
        "cls_token": t.take(f"{e}.cls_token", (1, 1, d)),
        "positions": t.take(f"{e}.position_embeddings", (1, c.n_tokens, d)),
        "patches.proj.weight": t.take(f"{e}.patch_embeddings.projection.weight", (d, c.channels, p, p)),
        "patches.proj.bias": t.take(f"{e}.patch_embeddings.projection.bias", (d,)),
        "norm.weight": t.take("vit.layernorm.weight", (d,)),
        "norm.bias": t.take("vit.layernorm.bias", (d,)),
    }
    state.update(prefixed("head", linear(t, "classifier", c.n_classes, d)))
    for i in range(c.n_layers):
        norms = ("layernorm_before", "layernorm_after")
        state.update(
            bert_style_layer(
                t, f"vit.encoder.layer.{i}", f"layers.{i}", d, f, attention="attention.attention", norms=norms
            )
        )
    return state
