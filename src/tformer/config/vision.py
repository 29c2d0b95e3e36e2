"""The vision family's [model] section: VisionConfig, a Vision Transformer (Dosovitskiy et al., 2021, "An
Image is Worth 16x16 Words") or, with architecture "cnn", a small convolutional baseline on the same data,
trainer and checkpoints. Imports no torch.

An image (channels, image_size, image_size) becomes (image_size / patch_size)^2 patch tokens (plus a
[CLS] token with "cls" pooling), so max_seq_len is derived from the sizes, never set by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tformer.config.base import ConfigError, check_choice, check_positive
from tformer.config.model import POOLINGS, TransformerConfig

VISION_POSITIONS = ("learned", "sinusoidal_2d", "none")
PATCH_EMBEDDINGS = ("conv", "unfold")  # one weight (C, channels, p, p), two ways of applying it
STEMS = ("patches", "conv")  # how an image becomes tokens: one linear map per patch, or a convolutional stem


@dataclass(frozen=True)
class VisionConfig(TransformerConfig):
    """ViT: patches -> linear embedding (+ [CLS]) + positions -> pre-norm encoder -> pooled -> linear head.
    Defaults: a small ViT for 28 x 28 grey images (Fashion-MNIST), 7 x 7 = 49 patches of 4 x 4."""

    image_size: int = 28
    patch_size: int = 4
    channels: int = 1  # 1: grey, 3: RGB
    n_classes: int = 10
    pooling: str = "cls"  # "cls": a learned [CLS] token in front of the patches; "mean": the patches' mean
    patch_embedding: str = "conv"  # "conv": a strided convolution; "unfold": unfold + linear (the same map)
    # "patches": each patch_size x patch_size patch is one token by one linear map (the ViT's patchify stem);
    # "conv": Xiao et al.'s (2021) convolutional stem, log2(patch_size) 3x3 convolutions of stride 2 (each with
    # batch norm and ReLU) down to the same grid of tokens, then a 1x1 convolution to d_model
    stem: str = "patches"
    stem_channels: tuple[int, ...] = ()  # the stride-2 convolutions' widths; () doubles up to d_model / 2
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 6
    dropout: float = 0.1
    max_seq_len: int = 0  # derived: the number of tokens (0 or that number)
    norm_first: bool = True  # ViT's layers are pre-norm, with a final LayerNorm
    activation: str = "gelu"
    positions: str = "learned"  # or "sinusoidal_2d" (fixed, row and column halves) or "none"
    scale_embeddings: bool = False
    # the baseline (architecture "cnn"): blocks of (conv 3x3 + batch norm + ReLU) x 2 + 2x2 max pooling, one
    # per entry, its output channels; then global average pooling, dropout, a linear head
    cnn_channels: tuple[int, ...] = (32, 64, 128)
    position_kinds: ClassVar[tuple[str, ...]] = VISION_POSITIONS

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive(name, image_size=self.image_size, patch_size=self.patch_size, channels=self.channels)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{name}.image_size = {self.image_size} is not divisible by patch_size = {self.patch_size}; "
                "the patches must tile the image"
            )
        tokens = self.n_tokens
        if self.max_seq_len not in (0, tokens):
            raise ConfigError(
                f"{name}.max_seq_len = {self.max_seq_len}, but an image is {tokens} tokens "
                f"((image_size / patch_size)^2{' + [CLS]' if self.pooling == 'cls' else ''}); leave it unset"
            )
        object.__setattr__(self, "max_seq_len", tokens)
        super().__post_init__()
        if self.n_classes < 2:
            raise ConfigError(f"{name}.n_classes must be >= 2, got {self.n_classes}")
        check_choice(name, "pooling", self.pooling, POOLINGS)
        check_choice(name, "patch_embedding", self.patch_embedding, PATCH_EMBEDDINGS)
        check_choice(name, "stem", self.stem, STEMS)
        self._check_stem(name)
        for key in ("token_types", "embedding_norm"):
            if getattr(self, key):
                raise ConfigError(f"{name}.{key} is for text; an image has no segments or token embedding")
        if self.positions == "sinusoidal_2d" and self.d_model % 4:
            raise ConfigError(
                f"{name}.positions = 'sinusoidal_2d' needs d_model divisible by 4 (sines and cosines of rows "
                f"and columns), got {self.d_model}"
            )
        if not self.cnn_channels or not all(w > 0 for w in self.cnn_channels):
            raise ConfigError(f"{name}.cnn_channels must be positive integers, got {list(self.cnn_channels)}")
        if self.architecture == "cnn" and self.image_size >> len(self.cnn_channels) < 1:
            raise ConfigError(
                f"{name}.cnn_channels has {len(self.cnn_channels)} blocks, each halving the image; "
                f"image_size = {self.image_size} allows at most {self.image_size.bit_length() - 1}"
            )

    def _check_stem(self, name: str) -> None:
        if self.stem == "patches":
            if self.stem_channels:
                raise ConfigError(f"{name}.stem_channels is for stem = 'conv'; stem = 'patches' has none")
            return
        p = self.patch_size
        if p < 2 or p & (p - 1):
            raise ConfigError(
                f"{name}.stem = 'conv' halves the image with each convolution, so patch_size must be a power "
                f"of two >= 2, got {p}"
            )
        if self.patch_embedding != "conv":
            raise ConfigError(f"{name}.patch_embedding = {self.patch_embedding!r} is for stem = 'patches'")
        if self.stem_channels and (
            len(self.stem_channels) != p.bit_length() - 1 or not all(w > 0 for w in self.stem_channels)
        ):
            raise ConfigError(
                f"{name}.stem_channels = {list(self.stem_channels)}: patch_size {p} needs "
                f"{p.bit_length() - 1} positive widths, one per stride-2 convolution (or none: derived)"
            )

    @property
    def stem_widths(self) -> tuple[int, ...]:
        """The conv stem's stride-2 widths: stem_channels, or doubling up to d_model / 2 (Xiao et al.)."""
        if self.stem_channels:
            return self.stem_channels
        n = self.patch_size.bit_length() - 1
        return tuple(max(self.d_model >> (n - i), 1) for i in range(n))

    def replace(self, **changes: object) -> VisionConfig:
        """A copy with `changes`; max_seq_len is derived again from the new sizes unless given."""
        return super().replace(**{"max_seq_len": 0, **changes})

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def n_tokens(self) -> int:
        """The sequence the encoder sees: the patches, and the [CLS] token in front with "cls" pooling."""
        return self.n_patches + (self.pooling == "cls")
