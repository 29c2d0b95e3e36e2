"""`tformer viz` for a vision checkpoint: the pooled query's attention over the patches per layer and head,
attention rollout (known answers), the PNGs and the page; the CNN baseline and misuse get clear errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from support.images import image_folder, tiny_vision
from tformer.cli import main
from tformer.data.transforms import Normalisation
from tformer.models.vit import VisionTransformer
from tformer.tasks.vision import ImageClassifier
from tformer.viz.vision import pooled_row, rollout, vision_maps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rollout_known_answers():
    t = 3
    # attention to itself only: the residual changes nothing, the rollout is the identity
    assert np.allclose(rollout([np.eye(t)[None].repeat(2, 0)] * 4), np.eye(t))
    # one layer of uniform attention: 0.5 I + 0.5 / t everywhere (rows already sum to 1)
    uniform = np.full((2, t, t), 1 / t)
    assert np.allclose(rollout([uniform]), 0.5 * np.eye(t) + 0.5 / t)
    # two layers multiply, the second on the left; heads are averaged first
    g = np.random.default_rng(0)
    a, b = (g.dirichlet(np.ones(t), size=(2, t)) for _ in range(2))
    step = [0.5 * np.eye(t) + 0.5 * w.mean(0) for w in (a, b)]
    assert np.allclose(rollout([a, b]), step[1] @ step[0])
    assert np.allclose(rollout([a, b]).sum(-1), 1.0)


def test_pooled_row_takes_the_cls_row_or_the_mean_row_over_the_patches():
    w = np.arange(2 * 5 * 5, dtype=float).reshape(2, 5, 5)  # 2 heads, [CLS] + 2 x 2 patches
    assert np.array_equal(pooled_row(w, "cls", 2), w[:, 0, 1:].reshape(2, 2, 2))
    assert np.allclose(pooled_row(w[:, 1:, 1:], "mean", 2), w[:, 1:, 1:].mean(1).reshape(2, 2, 2))


def _classifier(pooling="cls"):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_vision(pooling=pooling, image_size=8, patch_size=2)).eval()
    return ImageClassifier(model, ["cat", "dog", "eel"], Normalisation((0.4,), (0.2,)))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_maps_are_the_models_own_weights(tmp_path, pooling):
    image_folder(tmp_path / "imgs", {"cat": 1}, size=8)
    path = tmp_path / "imgs" / "cat" / "0.png"
    classifier = _classifier(pooling)
    maps = vision_maps(classifier, path)
    tokens = 16 + (pooling == "cls")
    assert len(maps.layers) == 2 and all(w.shape == (2, tokens, tokens) for w in maps.layers)
    assert all(np.allclose(w.sum(-1), 1.0) for w in maps.layers)  # softmax rows
    assert maps.grid == 4 and all(m.shape == (2, 4, 4) for m in maps.patch_maps())
    # the weights of the model's own first layer on the normalised image (the math backend, by hand)
    x = classifier.norm(torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32)[None, None] / 255))
    model = classifier.model
    with torch.no_grad():
        h = model.patches(x)
        if model.cls_token is not None:
            h = torch.cat([model.cls_token, h], dim=1)
        h = h + model.positions
        layer = model.layers[0]
        q, k, _ = layer.self_attn.in_proj(layer.norm1.pre(h)).chunk(3, dim=-1)
        q, k = (t.reshape(1, tokens, 2, 8).transpose(1, 2) for t in (q, k))
        want = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)[0].double().numpy()
    assert np.allclose(maps.layers[0], want, atol=1e-5)
    ((_, label, p),) = classifier.predict_files([path])
    assert maps.info["prediction"] == f"{label} ({p:.3f})"
    assert maps.image.shape == (8, 8) and 0 <= maps.image.min() <= maps.image.max() <= 1


def test_cli_writes_the_pngs_and_the_page(tmp_path, capsys):
    image_folder(tmp_path / "train", {"cat": 4, "dog": 4}, size=8)
    run = tmp_path / "run"
    common = f"--valid {tmp_path / 'train'} --out {run} --no-progress model.image_size=8 model.patch_size=4".split()
    common += [
        "model.d_model=16",
        "model.n_heads=2",
        "model.d_ff=32",
        "model.n_layers=2",
        "train.max_steps=2",
    ]
    common += ["train.batch_size=4"]
    assert main(["train", "vision", "--train", str(tmp_path / "train"), *common]) == 0
    capsys.readouterr()
    image = tmp_path / "train" / "dog" / "1.png"
    out = tmp_path / "viz"
    assert main(["viz", str(run / "checkpoint"), str(image), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 layers x 2 heads, and the rollout" in printed and "prediction: " in printed
    assert sorted(p.name for p in out.glob("*.png")) == [
        "vision-layer1.png",
        "vision-layer2.png",
        "vision-rollout.png",
    ]
    with Image.open(out / "vision-layer1.png") as im:
        assert im.size[0] > 300
    page = (out / "attention.html").read_text()
    data = json.loads(re.search(r'id="tformer-data" type="application/json">(.*?)</script>', page).group(1))
    assert data["grid"] == 2 and len(data["layers"]) == 2 and len(data["layers"][0]) == 2
    assert len(data["layers"][0][0]) == 4 and len(data["rollout"]) == 4
    assert data["image"].startswith("data:image/png;base64,") and data["query"] == "[CLS]"
    assert main(["viz", str(run / "checkpoint"), str(image), "--beam", "2"]) != 0
    assert "--beam is for translation checkpoints; this one classifies images" in capsys.readouterr().err
    assert main(["viz", str(run / "checkpoint"), str(tmp_path / "train")]) != 0
    assert "a folder; give one image file" in capsys.readouterr().err

    cnn = tmp_path / "cnn"
    args = ["train", "vision", "--train", str(tmp_path / "train"), *common, "model.architecture=cnn"]
    assert main([*args[:-1], "--out", str(cnn), *args[-1:]]) == 0
    capsys.readouterr()
    assert main(["viz", str(cnn / "checkpoint"), str(image)]) != 0
    assert "it has no attention to draw" in capsys.readouterr().err
