"""`tformer experiment vision`: the quick size end to end (generated images, both models trained through
the trainer, every file written, the numbers sane and the parameter counts the models' own); the clear
error of the real sizes without Fashion-MNIST; the ViT recipe = configs/fashion_mnist_vit.toml's. No
timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tformer.config import VisionConfig, load_toml
from tformer.experiments import run_experiment
from tformer.experiments.common import n_params
from tformer.experiments.vision import (
    QUICK_CLASSES,
    QUICK_CNN,
    QUICK_VIT,
    SETTINGS,
    TRAIN,
    VIT,
    _images_seen,
    generated_images,
)
from tformer.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


def test_vision_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_DATA", str(tmp_path / "no-data-here"))  # quick needs none
    out = tmp_path / "out"
    result = run_experiment("vision", out, "quick")
    data = json.loads((out / "result.json").read_text())
    assert data["name"] == "vision" and data["size"] == "quick"
    assert (out / "summary.md").read_text().startswith("# Experiment `vision` (quick)")
    assert result.plots == ["vision.png"]
    png = (out / "vision.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    runs = data["numbers"]["runs"]
    assert set(runs) == {"ViT", "CNN"}
    expected = {
        name: n_params(build_model(VisionConfig.from_dict(model)))
        for name, model in (("ViT", QUICK_VIT), ("CNN", QUICK_CNN))
    }
    budgets = SETTINGS["quick"]["budgets"]
    for name, points in runs.items():
        assert [p["budget"] for p in points] == budgets  # one run per budget
        for p in points:
            assert 0 < p["steps"] <= p["planned_steps"]
            assert p["train_seconds"] > 0 and p["images_per_second"] > 0
            assert 0.0 <= p["valid_accuracy"] <= 1.0 and 0.0 <= p["test_accuracy"] <= 1.0
            assert p["test_images"] == 400 and p["precision"] == "fp32"
            assert p["parameters"] == expected[name]
        assert max(p["test_accuracy"] for p in points) > 1.5 / len(QUICK_CLASSES)  # above chance: trained
        assert (
            out / "runs" / f"{name.lower()}-{budgets[-1]:g}s" / "checkpoint" / "model.safetensors"
        ).is_file()
    (table,) = data["tables"]
    assert len(table["rows"]) == 2 * len(budgets) and "test acc" in table["columns"]
    assert data["numbers"]["cpu"] in table["title"]


def test_vision_medium_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_DATA", str(tmp_path))
    with pytest.raises(ValueError) as err:
        run_experiment("vision", tmp_path / "out", "medium")
    message = str(err.value)
    assert str(tmp_path / "fashion_mnist") in message and "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message and "TFORMER_DATA" in message


def test_vit_recipe_is_the_example_configs():
    config = load_toml(REPO / "configs" / "fashion_mnist_vit.toml")
    model = config.model
    assert isinstance(model, VisionConfig)
    assert {k: getattr(model, k) for k in VIT} == VIT
    for key, value in TRAIN.items():
        if key != "seed":
            assert getattr(config.train, key) == value, key
    assert config.data.crop_padding == 2 and config.data.flip
    assert round(config.data.valid_fraction * 60000) == 5000


def test_generated_images_and_counts():
    x, y = generated_images(64, 3)
    again, labels = generated_images(64, 3)
    assert x.shape == (64, 8, 8) and x.dtype == np.uint8 and np.array_equal(x, again)
    assert np.array_equal(y, labels) and set(y.tolist()) == set(range(len(QUICK_CLASSES)))
    assert not np.array_equal(x, generated_images(64, 4)[0])
    # 2 epochs of ceil(10 / 4) = 3 batches (4, 4, 2), then one batch of 4
    assert _images_seen(7, 10, 4) == 24 and _images_seen(3, 10, 4) == 10
