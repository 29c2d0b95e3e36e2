"""The vision family end to end: `tformer train vision` -> `eval` -> `classify` on a tiny image folder, IDX
pairs and .npz (ViT and the CNN baseline), the checkpoint's classes and statistics, exact resume with
augmentation on, and the one-line errors of bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from support.images import idx_pair, image_folder
from tformer.cli import main
from tformer.config import DataConfig, RunConfig, TrainConfig
from tformer.pipeline import train
from tformer.tasks import open_predictor
from tformer.tasks.vision import ImageClassifier, VisionTask, build

TINY = ["model.image_size=8", "model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_layers=2"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_train_eval_classify(tmp_path, capsys):
    image_folder(tmp_path / "train", {"cat": 8, "dog": 8, "eel": 8}, size=10)
    image_folder(tmp_path / "valid", {"cat": 2, "dog": 2, "eel": 2}, size=10, seed=1)
    args = ["train", "vision", "--train", str(tmp_path / "train"), "--valid", str(tmp_path / "valid")]
    args += ["--out", str(tmp_path / "run"), "--no-progress", *TINY, "train.max_steps=40", "train.epochs=40"]
    args += ["train.batch_size=8", "train.lr=0.003", "train.warmup_steps=2", "data.flip=true"]
    args += ["data.crop_padding=1", "train.precision=bf16"]  # bfloat16 autocast steps
    code, out, err = _run(args, capsys)
    assert code == 0, err
    assert "24 training and 6 validation images, 3 classes ['cat', 'dog', 'eel']" in err
    assert "accuracy 1" in out
    ckpt = tmp_path / "run" / "checkpoint"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["task"] == "vision" and saved["classes"] == ["cat", "dog", "eel"]
    assert saved["model"]["n_classes"] == 3 and len(saved["normalisation"]["mean"]) == 1
    code, out, err = _run(["eval", str(ckpt), "--data", str(tmp_path / "valid")], capsys)
    assert code == 0 and "images: 6" in out and "accuracy: 1.0000" in out, err
    code, out, err = _run(
        ["eval", str(ckpt), "--data", str(tmp_path / "valid"), "--precision", "bf16"], capsys
    )
    assert code == 0 and "images: 6" in out, err  # the images follow the model's bfloat16 weights
    code, out, err = _run(
        ["classify", str(ckpt), str(tmp_path / "valid" / "dog" / "0.png"), str(tmp_path / "valid" / "eel")],
        capsys,
    )
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[1] for r in rows] == ["dog", "eel", "eel"] and all(0.3 < float(r[2]) <= 1 for r in rows)
    assert rows[1][0].endswith("eel/0.png")
    code, _, err = _run(["classify", str(ckpt), str(tmp_path / "nothing.png")], capsys)
    assert code == 2 and "nothing.png: file not found; expected an image file or a folder of images" in err


def test_idx_cnn_and_npz(tmp_path, capsys):
    images, labels = idx_pair(tmp_path / "idx", n=40, n_classes=4)
    args = ["train", "vision", "--train", str(images), str(labels), "--out", str(tmp_path / "run")]
    args += [
        "--no-progress",
        *TINY,
        "model.architecture=cnn",
        "model.cnn_channels=[4,8]",
        "model.n_classes=4",
    ]
    args += [
        "data.valid_fraction=0.25",
        'data.classes=["a","b","c","d"]',
        "train.max_steps=3",
        "train.batch_size=10",
    ]
    code, out, err = _run(args, capsys)
    assert code == 0, err
    assert "30 training and 10 validation images, 4 classes ['a', 'b', 'c', 'd']" in err
    assert "model: ImageCNN" in err
    code, out, err = _run(
        ["eval", str(tmp_path / "run" / "checkpoint"), "--data", str(images), str(labels)], capsys
    )
    assert code == 0 and "images: 40" in out, err
    x = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12) % 3)
    config = RunConfig.from_dict(
        {
            "task": "vision",
            "model": {"image_size": 8, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1},
            "data": {"train": [str(tmp_path / "d.npz")], "valid": [str(tmp_path / "d.npz")]},
        }
    )
    task, model = build(config)
    assert isinstance(task, VisionTask) and task.classes == [str(i) for i in range(10)]
    assert model.config.n_classes == 10 and task.evaluate(model)["accuracy"] >= 0


def test_bad_data_is_a_one_line_error(tmp_path, capsys):
    image_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    image_folder(tmp_path / "valid", {"cat": 1, "owl": 1})
    images, labels = idx_pair(tmp_path / "idx", n=9, n_classes=3)
    v_images, v_labels = idx_pair(tmp_path / "v", n=6, n_classes=3)
    t_images, t_labels = idx_pair(tmp_path / "t", n=6, n_classes=2)

    def error(train, valid, *overrides):
        base = ["train", "vision", "--out", str(tmp_path / "run"), "--no-progress", *TINY]
        code, _, err = _run(
            [*base, "--train", *map(str, train), "--valid", *map(str, valid), *overrides], capsys
        )
        assert code == 2 and len(err.strip().splitlines()) >= 1
        return err.strip().splitlines()[-1]

    folder = error([tmp_path / "train"], [tmp_path / "valid"])
    assert "class folder(s) ['owl'] never seen in training" in folder
    outside = error([images, labels], [images, labels], "model.n_classes=2")
    assert "label 2 at index 2 is outside the class range [0, 2)" in outside
    unseen = error([t_images, t_labels], [v_images, v_labels], "model.n_classes=3")
    assert "class '2' (label 2) at index 2 has no training images" in unseen
    size = error([images, labels], [images, labels], "model.image_size=6")
    assert "image_size = 6 is not divisible by patch_size = 4" in size
    named = error([tmp_path / "train"], [tmp_path / "train"], 'data.classes=["dog","cat"]')
    assert "data.classes = ['dog', 'cat'], but the image folder" in named and "['cat', 'dog']" in named
    code, _, err = _run(
        [
            "train",
            "vision",
            "--out",
            str(tmp_path / "r2"),
            "--no-progress",
            *TINY,
            "--train",
            str(t_images),
            str(t_labels),
            "--valid",
            str(t_images),
            str(t_labels),
            "train.max_steps=1",
        ],
        capsys,
    )
    assert code == 0 and "no training images of 8 class(es): ['2', '3', '4', '5', '6', '7', '8', '9']" in err


def test_resume_with_augmentation_is_exact(tmp_path, capsys):
    image_folder(tmp_path / "train", {"a": 6, "b": 6})

    def config(steps: int) -> RunConfig:
        data = DataConfig(
            train=(str(tmp_path / "train"),),
            valid=(str(tmp_path / "train"),),
            crop_padding=2,
            flip=True,
            mixup=0.4,
            cutmix=1.0,
        )
        t = TrainConfig(
            max_steps=steps,
            epochs=10,
            batch_size=4,
            lr=1e-3,
            warmup_steps=0,
            precision="fp32",
            eval_every_epochs=10,
        )
        return RunConfig(
            task="vision",
            model=RunConfig(task="vision").model.replace(
                image_size=8, d_model=16, n_heads=2, d_ff=32, n_layers=1
            ),
            train=t,
            data=data,
        )

    straight = train(config(8), tmp_path / "a", progress=False).checkpoint
    train(config(5), tmp_path / "b", progress=False)  # stops inside the second epoch (3 batches each)
    capsys.readouterr()
    resumed = train(config(8), tmp_path / "b", resume=True, progress=False).checkpoint
    assert "resumed at step 5 (epoch 2)" in capsys.readouterr().err
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    predictor = open_predictor(resumed)
    assert isinstance(predictor, ImageClassifier) and predictor.classes == ["a", "b"]
