"""Claim: the Transformer excels in computer vision as well as in NLP (Dosovitskiy et al., 2021, "An Image
is Worth 16x16 Words": a ViT pre-trained at scale matches or beats convolutional networks).

Measured at CPU scale: the vision family's ViT against its CNN baseline (`model.architecture = "cnn"`,
the family's defaults) on Fashion-MNIST at equal wall-clock training budgets, each through the real trainer
(`tformer.pipeline.train`, `train.max_time` = the budget, evaluation not counted), with the same split
(5,000 of the 60,000 training images held out by `train.seed` for validation; the 10,000 test images scored
once per run, at its end, by `pipeline.evaluate_checkpoint`), the same augmentation (random crop with
padding 2, horizontal flip), optimiser, label smoothing and `train.precision = "auto"`.

The ViT's recipe is configs/fashion_mnist_vit.toml's (a test keeps the two equal): a convolutional stem
(decision 105: a hybrid, named as one in every table and plot) down to a 7 x 7 grid of tokens + [CLS], 4
pre-norm layers of d_model 128, 4 heads, d_ff 256, no dropout, AdamW lr 1e-3 with weight decay 0.05, label
smoothing 0.1, batches of 128, a linear warm-up then cosine decay.

The schedule depends on the budget, so each budget is its own run: a short probe run per model (through
the trainer too, not counted) measures its steps per second on this machine, which sizes the warm-up (a
tenth of the steps that rate fits into the budget, at most one epoch of 430 steps); the decay itself is
the trainer's time-budgeted cosine (decision 102: its length predicted from the run's own rate after the
warm-up and again at 50, 75 and 90% of the decay), so it ends at the budget even where the run's steps are
slower than the probe's (the probe's rate sized the decay until 2026-12-07, and the ViT's full-size runs
on an AMD EPYC stopped 9% short of it). The quick size's seconds-long runs decay over the probe's
prediction instead and stop at it or at the budget, so what they do does not depend on the machine's
speed. The table gives the steps reached and the training seconds used. Budgets per model: "quick" a couple of seconds on a generated set of tiny images
(no data needed; for the tests), "medium" 1 and 2.5 minutes (8 minutes in all with one thread on a
2-core AMD EPYC), "full" 5, 15 and 30 minutes, the issue's points: since each budget is its own run, that
is 2 x 50 minutes of training, plus the probes, per-epoch validation and test scoring: about 105 minutes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from tformer.config import RunConfig, VisionConfig
from tformer.experiments.common import Result, Table, data_dir, line_plot, n_params

CLAIM = (
    "The Transformer excels in computer vision as well as NLP: a Vision Transformer matches or beats "
    "convolutional networks (Dosovitskiy et al., 2021)."
)
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# configs/fashion_mnist_vit.toml's [model] and the [train] keys that are not the budget's
VIT: dict[str, object] = {
    "image_size": 28,
    "patch_size": 4,
    "stem": "conv",
    "channels": 1,
    "n_classes": 10,
    "d_model": 128,
    "n_heads": 4,
    "d_ff": 256,
    "n_layers": 4,
    "dropout": 0.0,
    "pooling": "cls",
    "positions": "learned",
}
CNN: dict[str, object] = {"architecture": "cnn", "image_size": 28, "channels": 1, "n_classes": 10}
TRAIN: dict[str, object] = {
    "batch_size": 128,
    "lr": 1e-3,
    "schedule": "cosine",
    "weight_decay": 0.05,
    "label_smoothing": 0.1,
    "precision": "auto",
    "seed": 0,
}
VALID_IMAGES = 5000  # of Fashion-MNIST's 60,000 training images
MAX_WARMUP = 430  # one epoch of Fashion-MNIST's 55,000 training images in batches of 128


class Settings(TypedDict):
    budgets: list[float]  # seconds of training per run (train.max_time)
    probe_steps: int  # steps of the probe run that measures each model's rate


SETTINGS: dict[str, Settings] = {
    "quick": {"budgets": [0.5, 1.5], "probe_steps": 12},
    "medium": {"budgets": [60.0, 150.0], "probe_steps": 40},
    "full": {"budgets": [300.0, 900.0, 1800.0], "probe_steps": 60},
}
# quick: 8 x 8 generated images, tiny models, fp32 (the seconds go to training, not to timing bf16)
QUICK_SIZE = 8
QUICK_CLASSES = ("horizontal", "vertical", "square", "cross")
QUICK_VIT: dict[str, object] = {
    **VIT,
    "image_size": QUICK_SIZE,
    "patch_size": 2,
    "n_classes": len(QUICK_CLASSES),
    "d_model": 32,
    "n_heads": 2,
    "d_ff": 64,
    "n_layers": 2,
}
QUICK_CNN: dict[str, object] = {
    **CNN,
    "image_size": QUICK_SIZE,
    "n_classes": len(QUICK_CLASSES),
    "cnn_channels": [8, 16],
}
QUICK_TRAIN: dict[str, object] = {**TRAIN, "batch_size": 32, "lr": 3e-3, "precision": "fp32"}


def generated_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` noisy 8 x 8 grey images (N, 8, 8) uint8 of QUICK_CLASSES (labels (N,)): a horizontal or a
    vertical bar, a hollow square or a plus sign at a random place, on noise. Every class is its own mirror
    image, so the horizontal flip applies to them as to clothes."""
    rng = np.random.default_rng(seed)
    s = QUICK_SIZE
    x = rng.integers(0, 60, (n, s, s)).astype(np.int64)
    y = rng.integers(0, len(QUICK_CLASSES), n)
    for i, label in enumerate(y):
        r, c = rng.integers(1, s - 4, 2)  # the top-left corner of a 4 x 4 box inside the image
        box = x[i, r : r + 4, c : c + 4]
        if label == 0:
            box[rng.integers(0, 4), :] += 180
        elif label == 1:
            box[:, rng.integers(0, 4)] += 180
        elif label == 2:
            box[[0, -1], :] += 180
            box[1:-1, [0, -1]] += 180
        else:
            box[1, :] += 180
            box[[0, 2, 3], 1] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def _data(out: Path, size: str) -> tuple[list[str], list[str], dict[str, object], str]:
    """(training files, test files, the [data] section, a note saying which data)."""
    if size == "quick":
        folder = out / "data"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n, seed in (("train", 1200, 0), ("test", 400, 1)):
            x, y = generated_images(n, seed)
            np.savez(folder / f"{name}.npz", x=x, y=y)
        train, test = [str(folder / "train.npz")], [str(folder / "test.npz")]
        data: dict[str, object] = {"train": train, "valid_fraction": 0.1, "classes": list(QUICK_CLASSES)}
        note = (
            "Data: generated 8 x 8 images of 4 shapes on noise (1,200 training images, 120 of them held "
            "out for validation; 400 test images): the quick size checks the plumbing, not the claim."
        )
    else:
        root = data_dir("fashion_mnist", *FILES)
        if root is None:
            where = Path(os.environ.get("TFORMER_DATA", "../shared/data")) / "fashion_mnist"
            raise ValueError(
                f"experiment vision --size {size} needs Fashion-MNIST's IDX files {', '.join(FILES)} in "
                f"{where}; install them with `apt-get install dataset-fashion-mnist` (Debian) and point "
                "TFORMER_DATA at the folder holding fashion_mnist/, or run --size quick (generated images)"
            )
        train = [str(root / FILES[0]), str(root / FILES[1])]
        test = [str(root / FILES[2]), str(root / FILES[3])]
        data = {"train": train, "valid_fraction": VALID_IMAGES / 60000, "classes": list(CLASSES)}
        note = (
            f"Data: Fashion-MNIST ({root}): 55,000 training images, 5,000 held out by train.seed for "
            "validation, the 10,000 test images scored once at the end of each run."
        )
    return train, test, {**data, "crop_padding": 2 if size != "quick" else 1, "flip": True}, note


def _train(
    model: dict[str, object], data: dict[str, object], train: dict[str, object], out: Path, accel: bool
) -> Any:
    from tformer.pipeline import train as run_training

    config = RunConfig.from_dict({"task": "vision", "model": model, "train": train, "data": data})
    return run_training(config, out, overwrite=True, progress=False, accel=accel)


def _seconds_per_step(history: list[dict[str, Any]]) -> float:
    """The probe's steady rate: the training records after the first (which holds start-up costs)."""
    records = [r for r in history if r["type"] == "train"]
    if len(records) >= 2:
        first, last = records[0], records[-1]
        return (last["time"] - first["time"]) / max(1, last["step"] - first["step"])
    final = [r for r in history if r["type"] == "eval"][-1]
    return float(final["time"]) / max(1, int(final["step"]))


def _images_seen(steps: int, n_train: int, batch_size: int) -> int:
    """Images in `steps` batches of `batch_size` over epochs of `n_train` (the last batch of an epoch holds
    the remainder)."""
    per_epoch = math.ceil(n_train / batch_size)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * n_train + rest * batch_size


def _resolved_precision(checkpoint: Path) -> str:
    """The precision the run trained in ("auto" resolved), as its trainer state records it."""
    import json

    return str(json.loads((checkpoint / "trainer_state.json").read_text())["precision"])


def _tokens(vit: dict[str, object]) -> str:
    """How the ViT makes its tokens, in words (the plain patch embedding or the convolutional stem)."""
    p = vit["patch_size"]
    if vit.get("stem", "patches") == "conv":
        return (
            f"a convolutional stem (Xiao et al., 2021: stride-2 3x3 convolutions with batch norm and ReLU, "
            f"then a 1x1 to d_model) down to the grid of {p} x {p} patches: a hybrid, not Dosovitskiy et al.'s "
            "patch embedding"
        )
    return f"patches {p} x {p} (one linear map each)"


def _label(name: str, model: dict[str, object]) -> str:
    """A model's name in tables and plots: the hybrid is named as one wherever it is shown (decision 105)."""
    return f"{name}, conv stem" if model.get("stem") == "conv" else name


def cpu_name() -> str:
    """The CPU's model name and the instruction sets that decide bf16 (accel's machine fingerprint)."""
    from tformer.accel.machine import fingerprint

    fp = fingerprint()
    return f"{fp['cpu']} ({', '.join(fp['isa'])})" if fp["isa"] else fp["cpu"]


def run(out: Path, size: str) -> Result:
    from tformer.pipeline import evaluate_checkpoint

    s = SETTINGS[size]
    quick = size == "quick"
    train_files, test_files, data, data_note = _data(out, size)
    models = {"ViT": QUICK_VIT if quick else VIT, "CNN": QUICK_CNN if quick else CNN}
    base = {**(QUICK_TRAIN if quick else TRAIN), "epochs": 1000, "log_every": 5 if quick else 20}
    base |= {"save_every_steps": None, "keep_checkpoints": 1}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    curves: dict[str, list[dict[str, Any]]] = {}
    rates: dict[str, float] = {}
    for name, model in models.items():
        probe = _train(
            model,
            data,
            {**base, "max_steps": s["probe_steps"], "warmup_steps": 1, "log_every": 2},
            out / "runs" / f"{name.lower()}-probe",
            accel=not quick,
        )
        rates[name] = _seconds_per_step(probe.history)
        for budget in s["budgets"]:
            planned = max(2, int(budget / rates[name]))
            train = {
                **base,
                "max_time": budget,
                "max_steps": planned if quick else None,  # None: the trainer sizes the decay
                "warmup_steps": min(MAX_WARMUP, max(1, planned // 10)),
            }
            done = _train(model, data, train, out / "runs" / f"{name.lower()}-{budget:g}s", accel=not quick)
            final = [r for r in done.history if r["type"] == "eval"][-1]
            test = evaluate_checkpoint(done.checkpoint, test_files, accel=not quick)
            batch = int(base["batch_size"])  # type: ignore[call-overload]
            images = _images_seen(int(final["step"]), len(done.task.train_y), batch)
            runs[name].append(
                {
                    "budget": budget,
                    "planned_steps": planned,
                    "steps": int(final["step"]),
                    "train_seconds": float(final["time"]),
                    "images_per_second": images / max(float(final["time"]), 1e-9),
                    "parameters": n_params(done.model),
                    "precision": _resolved_precision(done.checkpoint),
                    "valid_accuracy": float(final["accuracy"]),
                    "test_accuracy": float(test["accuracy"]),
                    "test_macro_f1": float(test["macro_f1"]),
                    "test_images": int(test["images"]),
                }
            )
            curves[f"{_label(name, model)}, {budget:g} s"] = done.history
    return _result(out, size, runs, curves, rates, data_note, models)


def _result(
    out: Path,
    size: str,
    runs: dict[str, list[dict[str, Any]]],
    curves: dict[str, list[dict[str, Any]]],
    rates: dict[str, float],
    data_note: str,
    models: dict[str, dict[str, object]],
) -> Result:
    s = SETTINGS[size]
    cpu = cpu_name()
    result = Result("vision", CLAIM, size)
    vit, cnn = models["ViT"], models["CNN"]
    result.notes = [
        data_note,
        f"ViT: {_tokens(vit)}, {vit['n_layers']} pre-norm layers, d_model {vit['d_model']}, {vit['n_heads']} "
        f"heads, d_ff {vit['d_ff']}, dropout {vit['dropout']:g}, {vit['pooling']} pooling, {vit['positions']} "
        f"positions (configs/fashion_mnist_vit.toml's recipe{', scaled down' if size == 'quick' else ''}). CNN: the "
        "vision family's baseline, "
        f"{cnn.get('cnn_channels', list(VisionConfig.cnn_channels))} channels of (conv 3x3 + BN + ReLU) "
        "x 2 + max-pool blocks, global average pooling.",
        f"Both: AdamW lr {(QUICK_TRAIN if size == 'quick' else TRAIN)['lr']:g}, weight decay 0.05, label smoothing "
        "0.1, random crop + horizontal flip, train.precision "
        f"{'fp32' if size == 'quick' else 'auto'}, seed 0. Each budget is its own run: warm-up then cosine "
        "decay over the steps the probe's rate fits into the budget (seconds per step: "
        + ", ".join(f"{n} {r:.3g}" for n, r in rates.items())
        + "); it stops there or at the budget.",
        f"CPU: {cpu}. Training seconds are the trainer's (evaluation not counted); on a shared CPU the steps "
        "reached depend on the load at the time. The final model of each run is scored on the test set once "
        "(the validation accuracy is the same model's).",
    ]
    label = {name: _label(name, models[name]) for name in runs}
    rows: list[list[object]] = []
    for name, points in runs.items():
        for p in points:
            rows.append(
                [
                    label[name],
                    p["budget"],
                    p["train_seconds"],
                    f"{p['steps']} / {p['planned_steps']}",
                    f"{p['images_per_second']:.0f}",
                    f"{p['parameters']:,}",
                    p["precision"],
                    p["valid_accuracy"],
                    p["test_accuracy"],
                ]
            )
    result.tables.append(
        Table(
            f"Test accuracy at equal training budgets ({cpu})",
            [
                "model",
                "budget s",
                "train s",
                "steps / planned",
                "images/s",
                "parameters",
                "precision",
                "valid acc",
                "test acc",
            ],
            rows,
        )
    )
    result.numbers = {"cpu": cpu, "budgets_seconds": s["budgets"], "seconds_per_step": rates, "runs": runs}
    longest = max(s["budgets"])
    loss_series = {
        label: (
            [r["time"] for r in h if r["type"] == "train" and "loss" in r],
            [r["loss"] for r in h if r["type"] == "train" and "loss" in r],
        )
        for label, h in curves.items()
        if label.endswith(f"{longest:g} s")
    }
    by_budget = {
        f"{b:g} s": (
            [runs[name][i]["parameters"] for name in runs],
            [runs[name][i]["test_accuracy"] for name in runs],
        )
        for i, b in enumerate(s["budgets"])
    }
    result.plots.append(
        line_plot(
            out / "vision.png",
            [
                {
                    "series": {
                        label[name]: ([p["train_seconds"] for p in ps], [p["test_accuracy"] for p in ps])
                        for name, ps in runs.items()
                    },
                    "xlabel": "training seconds (one run per budget)",
                    "ylabel": "test accuracy",
                    "title": "test accuracy vs training time",
                },
                {
                    "series": by_budget,
                    "xlabel": "parameters",
                    "ylabel": "test accuracy",
                    "logx": True,
                    "title": "test accuracy vs parameters (" + " and ".join(label.values()) + ")",
                },
                {
                    "series": loss_series,
                    "xlabel": "training seconds",
                    "ylabel": "training loss (label-smoothed)",
                    "title": f"training loss, {longest:g} s budget",
                },
            ],
            title=f"ViT vs CNN at equal wall-clock budgets ({cpu.split(' (')[0]}, {size} size)",
        )
    )
    return result
