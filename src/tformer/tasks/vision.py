"""Vision: images -> a ViT (or the CNN baseline); cross-entropy (soft targets under mixup / cutmix);
accuracy and macro-F1; label + probability prediction from a checkpoint.

The training split's per-channel mean and std normalise every split and every prediction; they are saved
in config.json ("normalisation") with the class names in order ("classes"). Augmentation (data.crop_padding,
flip, mixup, cutmix) draws from one numpy Generator per batch seeded by (train.seed, epoch, batch index):
the trainer's checkpoint holds that position, so a resumed run augments exactly as an unbroken one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from tformer.config import ConfigError, DataConfig, RunConfig, TrainConfig, VisionConfig
from tformer.data.images import (
    ImageSet,
    check_labels,
    check_seen,
    image_files,
    load_image,
    read_images,
    report_skipped_files,
)
from tformer.data.transforms import Augmentation, Normalisation, to_unit
from tformer.families.roles import EvalRequest
from tformer.inference.modes import evaluating
from tformer.metrics import accuracy, macro_f1
from tformer.models import build_model
from tformer.models.vit import VisionTransformer
from tformer.tasks.common import CheckpointPredictor, log, model_device, need, progress
from tformer.training.checkpoint import CheckpointError
from tformer.training.trainer import LossValue

BATCH_SIZE = 128  # images per batch when train.batch_size is not set


@dataclass
class ImageBatch:
    index: torch.Tensor  # (B,) positions in the training split
    seed: tuple[int, int, int]  # (train.seed, epoch, batch): the augmentation's random stream


def class_probabilities(
    model: VisionTransformer, images: torch.Tensor, norm: Normalisation, *, show_progress: bool = True
) -> torch.Tensor:
    """(N, C, H, W) uint8 or [0, 1] images -> probabilities (N, n_classes), in eval mode, batched.
    `show_progress=False`: no progress bar even on a terminal (a server calls this per batch)."""
    device, batch = model_device(model), 256
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # bf16 after --precision bf16
    out = torch.empty(len(images), model.config.n_classes)
    starts = range(0, len(images), batch)
    with evaluating(model), torch.no_grad():
        for start in progress(starts, len(starts), "classifying") if show_progress else starts:
            x = norm(to_unit(images[start : start + batch]).to(device))
            out[start : start + batch] = model.probabilities(x.to(dtype)).cpu()
    return out


class VisionTask:
    name = "vision"

    def __init__(
        self,
        model_config: VisionConfig,
        train_config: TrainConfig,
        data_config: DataConfig,
        classes: Sequence[str],
        train: ImageSet,
        valid: ImageSet,
        *,
        norm: object = None,
    ) -> None:
        """`norm`: the normalisation of pretrained weights (train.init_from; Normalisation.to_dict's form),
        which its images were scaled by; None: the training split's statistics."""
        self.model_config, self.train_config, self.classes = model_config, train_config, list(classes)
        self.train_x, self.train_y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
        self.valid_x, self.valid_y = torch.from_numpy(valid.images), torch.from_numpy(valid.labels)
        self.norm = (
            Normalisation.of(self.train_x) if norm is None else Normalisation.from_dict(norm, "init_from")
        )
        self.augment = Augmentation(
            data_config.crop_padding, data_config.flip, data_config.mixup, data_config.cutmix
        )
        self.batch_size = train_config.batch_size or BATCH_SIZE

    def train_batches(self, epoch: int) -> list[ImageBatch]:
        seed = self.train_config.seed
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(self.train_y)))
        size = self.batch_size  # every image once per epoch: the last batch holds the remainder
        return [
            ImageBatch(order[start : start + size], (seed, epoch, i))
            for i, start in enumerate(range(0, len(order), size))
        ]

    def inputs(self, batch: ImageBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's normalised, augmented images and its targets (indices, or probabilities when mixing)."""
        x = to_unit(self.train_x[batch.index]).to(device)
        x, targets = self.augment(
            x,
            self.train_y[batch.index].to(device),
            self.model_config.n_classes,
            np.random.default_rng(list(batch.seed)),
        )
        return self.norm(x), targets

    def loss(self, model: VisionTransformer, batch: ImageBatch) -> LossValue:
        x, targets = self.inputs(batch, model_device(model))
        logits = model(x).logits
        loss = F.cross_entropy(
            logits.float(), targets, reduction="sum", label_smoothing=self.train_config.label_smoothing
        )
        return LossValue(loss, len(batch.index), len(batch.index))

    def evaluate(self, model: VisionTransformer) -> dict[str, float]:
        probs = class_probabilities(model, self.valid_x, self.norm)
        nll = F.nll_loss(probs.clamp_min(1e-12).log(), self.valid_y).item()
        pred, gold = probs.argmax(-1).tolist(), self.valid_y.tolist()
        return {
            "valid_nll": nll,
            "accuracy": accuracy(pred, gold),
            "macro_f1": macro_f1(pred, gold, len(self.classes)),
        }

    def checkpoint_config(self) -> dict[str, object]:
        return {
            "task": self.name,
            "model": self.model_config.to_dict(),
            "classes": self.classes,
            "normalisation": self.norm.to_dict(),
        }

    def write_files(self, directory: Path) -> None:
        """Nothing beside config.json: the classes and statistics are in it."""


class ImageClassifier(CheckpointPredictor):
    """A trained vision checkpoint: images in, (label, probability) out (`load`: tasks/common.py)."""

    family = "vision"

    def __init__(
        self, model: VisionTransformer, classes: Sequence[str], norm: Normalisation, *, resize: bool = True
    ) -> None:
        self.model, self.classes, self.norm, self.resize = model.eval(), list(classes), norm, resize

    @classmethod
    def from_checkpoint(
        cls, path: Path, raw: Mapping[str, object], model: torch.nn.Module
    ) -> ImageClassifier:
        vit = cast(VisionTransformer, model)  # the CNN baseline has the same interface
        classes, n_classes = raw.get("classes"), vit.config.n_classes
        if (
            not isinstance(classes, list)
            or len(classes) != n_classes
            or not all(isinstance(c, str) for c in classes)
        ):
            raise CheckpointError(f"{path / 'config.json'}: 'classes' must list the {n_classes} class names")
        try:
            norm = Normalisation.from_dict(raw.get("normalisation"), str(path / "config.json"))
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        if len(norm.mean) != vit.config.channels:
            raise CheckpointError(
                f"{path / 'config.json'}: 'normalisation' has {len(norm.mean)} channels, the model {vit.config.channels}"
            )
        data = raw.get("data")
        resize = data.get("resize", True) if isinstance(data, dict) else True
        return cls(vit, classes, norm, resize=bool(resize))

    def probabilities(self, images: torch.Tensor, *, show_progress: bool = True) -> torch.Tensor:
        """(N, channels, image_size, image_size) uint8 or [0, 1] images -> (N, n_classes)."""
        return class_probabilities(self.model, images, self.norm, show_progress=show_progress)

    def load_files(self, paths: Sequence[str | Path]) -> tuple[list[Path], torch.Tensor]:
        """Image files and folders (every image under a folder, sorted) -> (the files, their pixels)."""
        c = self.model.config
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                found, others = image_files(p)
                if not found:
                    raise ValueError(f"{p}: no image files in this folder; expected PNG, JPEG, ...")
                if others:
                    log(
                        f"{p}: skipped {len(others)} file(s) without an image suffix ({', '.join(others[:5])})"
                    )
                files += found
            elif not p.exists():
                raise ValueError(f"{p}: file not found; expected an image file or a folder of images")
            else:
                files.append(p)
        if not files:
            raise ValueError("no images given: name image files or folders")
        pixels = [load_image(f, channels=c.channels, size=c.image_size, resize=self.resize) for f in files]
        return files, torch.from_numpy(np.stack(pixels))

    def predict_files(self, paths: Sequence[str | Path]) -> list[tuple[Path, str, float]]:
        files, images = self.load_files(paths)
        probs = self.probabilities(images)
        best = probs.argmax(-1)
        return [
            (f, self.classes[int(i)], float(probs[n, i]))
            for n, (f, i) in enumerate(zip(files, best, strict=True))
        ]


def class_names(config: RunConfig, train: ImageSet) -> list[str]:
    """An image folder's classes, or data.classes, or "0".."n_classes-1" for IDX / .npz labels."""
    if train.classes is not None:
        if config.data.classes and list(config.data.classes) != train.classes:
            raise ConfigError(
                f"data.classes = {list(config.data.classes)}, but the image folder {train.source} has the "
                f"classes {train.classes}; leave data.classes unset for a folder"
            )
        return train.classes
    if config.data.classes:
        return list(config.data.classes)
    return [str(i) for i in range(config.model.n_classes)]


def split(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Hold out `fraction` of the images (drawn by `seed`) for validation."""
    order = np.random.default_rng([seed, 2**31]).permutation(len(data))
    n_valid = max(1, round(fraction * len(data)))
    if n_valid >= len(data):
        raise ConfigError(f"data.valid_fraction = {fraction} leaves no training images of {len(data)}")
    keep, held = np.sort(order[n_valid:]), np.sort(order[:n_valid])

    def part(idx: np.ndarray, what: str) -> ImageSet:
        return ImageSet(data.images[idx], data.labels[idx], f"{data.source} ({what})", data.classes)

    return part(keep, "training part"), part(held, "held-out part")


def read_split(config: RunConfig, paths: list[str], classes: Sequence[str] | None) -> ImageSet:
    m, d = config.model, config.data
    data = read_images(paths, channels=m.channels, size=m.image_size, resize=d.resize, classes=classes)
    report_skipped_files(data)
    return data


def build(config: RunConfig, saved: Path | None = None) -> tuple[VisionTask, torch.nn.Module]:
    """`tformer train vision`: image files -> classes, statistics, task and model (the model's n_classes
    from the classes). `saved` (a checkpoint being resumed) needs nothing: the data gives the same."""
    m, d = config.model, config.data
    if not isinstance(m, VisionConfig):
        raise ConfigError(f"task 'vision' needs a VisionConfig, got {type(m).__name__}")
    from tformer.interop.init_from import run_start

    start = run_start(config)  # train.init_from: the source's architecture, normalisation and weights
    if start is not None:  # the images are read at the source's size and channels
        m = start.model_config(m, n_classes=m.n_classes)
        config = config.replace(model=m)
    train = read_split(config, need(config, "train"), None)
    classes = class_names(config, train)
    if config.data.paths("valid"):
        valid = read_split(config, need(config, "valid"), train.classes)
    elif d.valid_fraction > 0:
        train, valid = split(train, d.valid_fraction, config.train.seed)
    else:
        raise ConfigError("no valid data: give --valid FILE(S) or data.valid_fraction (a held-out share)")
    if len(classes) < 2:
        raise ConfigError(
            f"{train.source}: found only the class(es) {classes}; a classifier needs at least two"
        )
    for part in (train, valid):
        check_labels(part, len(classes))
    check_seen(valid, train, classes)
    empty = sorted(set(range(len(classes))) - set(np.unique(train.labels).tolist()))
    if empty:  # allowed (IDX / .npz with data.classes or model.n_classes), but said
        log(f"{train.source}: no training images of {len(empty)} class(es): {[classes[i] for i in empty]}")
    log(
        f"vision: {len(train):,} training and {len(valid):,} validation images, {len(classes)} classes {classes}"
    )
    model_config = m.replace(n_classes=len(classes))
    norm = start.extra.get("normalisation") if start is not None else None
    task = VisionTask(model_config, config.train, d, classes, train, valid, norm=norm)
    return task, start.build(model_config) if start is not None else build_model(model_config)


def evaluate_files(path: Path, data: list[str], request: EvalRequest) -> dict[str, object]:
    """`tformer eval` of a vision checkpoint: accuracy and macro-F1 on IDX images + labels, an image
    folder or a .npz."""
    predictor = ImageClassifier.load(path, precision=request.precision, accel=request.accel)
    c = predictor.model.config
    images = read_images(
        data, channels=c.channels, size=c.image_size, resize=predictor.resize, classes=predictor.classes
    )
    report_skipped_files(images)
    check_labels(images, len(predictor.classes))
    pred = predictor.probabilities(torch.from_numpy(images.images)).argmax(-1).tolist()
    gold = images.labels.tolist()
    return {
        "images": len(gold),
        "accuracy": accuracy(pred, gold),
        "macro_f1": macro_f1(pred, gold, len(predictor.classes)),
    }
