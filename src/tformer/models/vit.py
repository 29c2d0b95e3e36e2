"""The Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"): an image cut into
patches, each patch a token (or, with `stem = "conv"`, the same grid of tokens from a small convolutional
stem: Xiao et al., 2021); then the package's own pre-norm self-attention layers (models/builders.py,
any attention backend), a final LayerNorm, pooling ([CLS] or mean) and a linear head (section 3.1).

Images come in normalised (the task and predictor apply the training split's statistics): (B, channels,
image_size, image_size) floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import VisionConfig
from tformer.layers import dropout_layer, init_linears_, layer_norm
from tformer.models.builders import self_attention_layer
from tformer.models.checkpointing import LayerCheckpointing
from tformer.positions import sinusoidal_table


@dataclass
class VisionOutput:
    logits: Tensor  # (B, n_classes)
    attention: list[Tensor] | None = None  # per layer (B, H, T, T), when asked for (T: tokens)


def check_images(images: Tensor, *, channels: int, size: int) -> None:
    """Raise a clear error for anything but (B, channels, size, size) floating-point images."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (normalised), got dtype {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"images have shape {tuple(images.shape)}; expected (B, {channels}, {size}, {size}) "
            "(batch, channels, height, width)"
        )


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches -> d_model vectors, one weight (C, channels, p, p) applied either as a
    convolution with stride p ("conv") or by cutting the patches out (unfold) and one linear map
    ("unfold"): the same function, checked equal by test."""

    def __init__(self, channels: int, patch_size: int, d_model: int, *, method: str = "conv") -> None:
        super().__init__()
        if method not in ("conv", "unfold"):
            raise ValueError(f"patch embedding method {method!r}; expected 'conv' or 'unfold'")
        self.patch_size, self.method = patch_size, method
        self.proj = nn.Conv2d(channels, d_model, patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """(B, ch, H, W) -> (B, N, C), patches in row-major order (N = (H / p) * (W / p))."""
        p = self.patch_size
        if self.method == "conv":
            return self.proj(images).flatten(2).transpose(1, 2)  # (B, C, H/p, W/p) -> (B, N, C)
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, ch * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class ConvStem(nn.Module):
    """Xiao et al. (2021, "Early Convolutions Help Transformers See Better"): the patchify stem replaced by
    3x3 convolutions of stride 2, each with batch norm and ReLU, down to the patch grid (one per halving:
    log2(patch_size) of them), then a 1x1 convolution to d_model (`proj`). The same tokens, on the same
    grid, as a patch embedding of patch_size; locality and overlap come from the small kernels."""

    def __init__(self, channels: int, widths: tuple[int, ...], d_model: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for n_in, n_out in zip((channels, *widths[:-1]), widths, strict=True):
            layers += [
                nn.Conv2d(n_in, n_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(n_out),
                nn.ReLU(inplace=True),
            ]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(widths[-1], d_model, 1)

    def forward(self, images: Tensor) -> Tensor:
        """(B, ch, H, W) -> (B, N, C), tokens in row-major order of the (H / p) x (W / p) grid."""
        return self.proj(self.convs(images)).flatten(2).transpose(1, 2)


def sinusoidal_2d_table(grid: int, d_model: int) -> Tensor:
    """(grid * grid, d_model) fixed positions of a grid of patches: the paper's sinusoids (section 3.5) of
    the row in the first half of the features and of the column in the second (MAE's 2-D sin-cos)."""
    half = sinusoidal_table(grid, d_model // 2)  # (grid, C / 2)
    rows = half[:, None, :].expand(grid, grid, -1)
    cols = half[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, d_model)


class VisionTransformer(LayerCheckpointing, nn.Module):
    """Patches (+ [CLS], positions, dropout) -> N pre-norm self-attention layers (recomputed in backward
    when `checkpoint_activations` is set: models/checkpointing.py) -> norm, pooling, head."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.architecture != "transformer":
            raise ValueError(f"VisionTransformer needs architecture 'transformer', got {c.architecture!r}")
        self.patches: PatchEmbedding | ConvStem = (
            ConvStem(c.channels, c.stem_widths, c.d_model)
            if c.stem == "conv"
            else PatchEmbedding(c.channels, c.patch_size, c.d_model, method=c.patch_embedding)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.pooling == "cls" else None
        if c.positions == "learned":
            self.positions: Tensor | None = nn.Parameter(torch.randn(1, c.n_tokens, c.d_model) * 0.02)
        elif c.positions == "sinusoidal_2d":  # derived, not saved; the [CLS] token gets none
            table = sinusoidal_2d_table(c.grid, c.d_model)
            table = torch.cat([torch.zeros(c.n_tokens - c.n_patches, c.d_model), table])[None]
            self.register_buffer("positions", table, persistent=False)
        else:
            self.positions = None
        self.dropout = dropout_layer(c.dropout)
        self.layers = nn.ModuleList(self_attention_layer(c) for _ in range(c.n_layers))
        self.norm = layer_norm(c.d_model, c.layer_norm_eps, c.bias) if c.use_final_norm else nn.Identity()
        self.head_dropout = dropout_layer(c.dropout)
        self.head = nn.Linear(c.d_model, c.n_classes)
        for layer in self.layers:
            init_linears_(layer, nn.init.xavier_uniform_)

    def forward(self, images: Tensor, *, need_weights: bool = False) -> VisionOutput:
        """images (B, channels, image_size, image_size), normalised -> class logits (B, n_classes)."""
        c = self.config
        if not torch.compiler.is_exporting():
            check_images(images, channels=c.channels, size=c.image_size)
        # (B, N, C); the residual stream in the weights' dtype, as the text stacks' embeddings give it (a
        # bfloat16 convolution under autocast would otherwise carry bfloat16 into every LayerNorm and sum)
        x = self.patches(images).to(self.patches.proj.weight.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, T, C)
        if self.positions is not None:
            x = x + self.positions.to(x.dtype)
        x = self.dropout(x)
        weights: list[Tensor] | None = [] if need_weights else None
        for layer in self.layers:
            o = self.run_layer(layer, x, need_weights=need_weights)
            x = o.x
            if weights is not None and o.weights is not None:
                weights.append(o.weights)
        x = self.norm(x)
        pooled = x[:, 0] if c.pooling == "cls" else x.mean(1)  # (B, C)
        return VisionOutput(self.head(self.head_dropout(pooled)), weights)

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        return torch.softmax(self.forward(images).logits.float(), dim=-1)
