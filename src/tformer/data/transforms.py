"""Image tensor transforms for the vision family: normalisation and training augmentation on whole batches
(B, C, H, W) of floats in [0, 1], written here because torchvision's wheel does not load against this
torch build.

Every random draw comes from a `numpy.random.Generator` the caller passes in; the vision task makes one
per batch from (train.seed, epoch, batch index), so augmentation is a function of the seed and of where
training is, which the trainer's checkpoint holds (epoch, batch position): a resumed run draws the same
crops and flips as one that never stopped, in any number of processes.

- `random_crop`: zero-pad by `padding` pixels, cut an image-sized window at a random offset (per image);
- `hflip`: mirror left-right with probability 1/2 (per image);
- `mixup` (Zhang et al., 2018): x' = lam x + (1 - lam) x[perm], targets likewise, lam ~ Beta(a, a);
- `cutmix` (Yun et al., 2019): a box of x[perm] pasted into x, targets mixed by the box's area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and standard deviation of the training images (in [0, 1] units)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, images: Tensor, *, chunk: int = 4096) -> Normalisation:
        """The statistics of (N, C, H, W) images (uint8 0..255 or floats in [0, 1]), in float64."""
        n_channels = images.shape[1]
        total = torch.zeros(n_channels, dtype=torch.float64)
        squares = torch.zeros(n_channels, dtype=torch.float64)
        for start in range(0, len(images), chunk):
            x = to_unit(images[start : start + chunk]).double()
            total += x.sum(dim=(0, 2, 3))
            squares += (x * x).sum(dim=(0, 2, 3))
        count = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    @classmethod
    def from_dict(cls, data: object, source: str) -> Normalisation:
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) and all(isinstance(v, (int, float)) for v in data[k])
            for k in ("mean", "std")
        ):
            raise ValueError(f"{source}: 'normalisation' must hold lists 'mean' and 'std', got {data!r}")
        mean, std = tuple(map(float, data["mean"])), tuple(map(float, data["std"]))
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise ValueError(f"{source}: 'normalisation' needs one positive std per mean, got {data!r}")
        return cls(mean, std)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> normalised."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std


def to_unit(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 in [0, 1]; floats as they are (float32)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def random_crop(x: Tensor, padding: int, rng: np.random.Generator) -> Tensor:
    """(B, C, H, W): each image zero-padded by `padding` on every side, then an H x W window at a random
    offset in [0, 2 * padding] along each axis (torchvision's RandomCrop(size, padding))."""
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    dy = torch.from_numpy(rng.integers(0, 2 * padding + 1, size=b))
    dx = torch.from_numpy(rng.integers(0, 2 * padding + 1, size=b))
    rows = (dy[:, None] + torch.arange(h)).to(x.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def hflip(x: Tensor, rng: np.random.Generator, p: float = 0.5) -> Tensor:
    """(B, C, H, W): each image mirrored left-right with probability `p`."""
    flip = torch.from_numpy(rng.random(x.shape[0]) < p).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def mixup(x: Tensor, targets: Tensor, alpha: float, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """x (B, C, H, W), targets (B, K) probabilities -> both mixed with a shuffled copy of the batch."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def cutmix(x: Tensor, targets: Tensor, alpha: float, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """A box of area about (1 - lam) H W from a shuffled copy pasted into each image (clipped at the
    borders); targets mixed by the box's real area."""
    b, _, h, w = x.shape
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(b)).to(x.device)
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return out, kept * targets + (1 - kept) * targets[perm]


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation data.* asks for, applied in this order: crop, flip, then mixup or cutmix
    (when both are on, one of them per batch, each with probability 1/2)."""

    crop_padding: int = 0
    flip: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(
        self, x: Tensor, labels: Tensor, n_classes: int, rng: np.random.Generator
    ) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) in [0, 1], labels (B,) -> augmented x and targets: (B,) class indices, or (B, K)
        probabilities when mixing."""
        x = random_crop(x, self.crop_padding, rng)
        if self.flip:
            x = hflip(x, rng)
        if not self.mixes:
            return x, labels
        targets = F.one_hot(labels, n_classes).to(x.dtype)
        use_mixup = self.cutmix <= 0 or (self.mixup > 0 and rng.random() < 0.5)
        if use_mixup:
            return mixup(x, targets, self.mixup, rng)
        return cutmix(x, targets, self.cutmix, rng)
