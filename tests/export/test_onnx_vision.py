"""ONNX export of the vision family: the ViT's and the CNN's graphs in ONNX Runtime equal PyTorch to 1e-4
on another batch size than the traced one."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch

from support.images import image_folder
from tformer import cli
from tformer.tasks import open_predictor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "model",
    [["model.architecture=transformer"], ["model.stem=conv"], ["model.architecture=cnn"]],
    ids=["vit", "conv-stem", "cnn"],
)
def test_vision_graph_equals_pytorch(tmp_path, model):
    image_folder(tmp_path / "data", {"a": 3, "b": 3})
    args = ["train", "vision", "--train", str(tmp_path / "data"), "--valid", str(tmp_path / "data")]
    args += ["--out", str(tmp_path / "run"), "--no-progress", "model.image_size=8", "model.d_model=16"]
    args += ["model.n_heads=2", "model.d_ff=32", "model.n_layers=1", "model.dropout=0.3", "train.max_steps=2"]
    args += [*model, "model.cnn_channels=[4]", "train.batch_size=3"]
    assert cli.main(args) == 0
    ckpt = tmp_path / "run" / "checkpoint"
    assert cli.main(["export", "onnx", str(ckpt), str(tmp_path / "onnx")]) == 0
    meta = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert meta["graphs"]["vision"]["inputs"]["images"]["shape"] == ["batch", 1, 8, 8]
    assert "normalisation" in json.loads((tmp_path / "onnx" / "config.json").read_text())
    session = ort.InferenceSession(str(tmp_path / "onnx" / "vision.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 1, 8, 8)
    (got,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = open_predictor(ckpt).model(images).logits
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-4)
