"""Hugging Face ViTForImageClassification -> tformer's VisionTransformer, against transformers on a small
random model saved here: logits equal to 1e-5 (every parameter redrawn with a large spread, so a tensor in
the wrong place shows), the loading strict both ways, and the imported checkpoint predicting from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e .[test])"
)

from PIL import Image  # noqa: E402

from tformer.cli import main  # noqa: E402
from tformer.config import ConfigError  # noqa: E402
from tformer.interop import InteropError, import_hf, save_imported  # noqa: E402
from tformer.tasks import open_predictor  # noqa: E402
from tformer.tasks.vision import ImageClassifier  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "ant", 1: "bee", 2: "cow"},
        label2id={"ant": 0, "bee": 1, "cow": 2},
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if p.dim() == 1 and "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + gain)
    out = tmp_path_factory.mktemp("hf-vit")
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3]})
    )
    return out


def _hf_logits(directory: Path, images: torch.Tensor) -> torch.Tensor:
    model = transformers.ViTForImageClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(pixel_values=images).logits


def test_vit_logits_equal(vit_dir: Path) -> None:
    imported = import_hf(vit_dir)
    assert imported.task == "vision" and imported.extra["classes"] == ["ant", "bee", "cow"]
    images = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        ours = imported.model(images).logits
    torch.testing.assert_close(ours, _hf_logits(vit_dir, images), rtol=0, atol=ATOL)


def test_imported_checkpoint_classifies_like_transformers(vit_dir: Path, tmp_path: Path, capsys) -> None:
    path = save_imported(import_hf(vit_dir), tmp_path / "ckpt")
    predictor = open_predictor(path)
    assert isinstance(predictor, ImageClassifier) and predictor.norm.mean == (0.4, 0.5, 0.6)
    pixels = torch.randint(
        0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    for i, p in enumerate(pixels):
        Image.fromarray(p.numpy(), "RGB").save(tmp_path / f"{i}.png")
    # the image processor's way: rescale to [0, 1], normalise with its mean and std
    unit = pixels.permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.4, 0.5, 0.6])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    want = torch.softmax(_hf_logits(vit_dir, (unit - mean) / std), -1)
    assert main(["classify", str(path), str(tmp_path / "0.png"), str(tmp_path / "1.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    for i, line in enumerate(lines):
        name, label, prob = line.split("\t")
        assert name.endswith(f"{i}.png") and label == ["ant", "bee", "cow"][int(want[i].argmax())]
        assert abs(float(prob) - float(want[i].max())) < 1e-4


def test_loading_is_strict(vit_dir: Path, tmp_path: Path) -> None:
    def copy_with(tensors: dict[str, torch.Tensor], name: str, **config: object) -> Path:
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        data = json.loads((vit_dir / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**data, **config}))
        return d

    tensors = load_file(str(vit_dir / "model.safetensors"))
    extra = copy_with({**tensors, "vit.pooler.dense.weight": torch.zeros(16, 16)}, "extra")
    with pytest.raises(
        InteropError, match=r"1 tensor\(s\) tformer does not know how to use: vit.pooler.dense.weight"
    ):
        import_hf(extra)
    missing = copy_with({k: v for k, v in tensors.items() if "layer.1.output.dense.bias" not in k}, "missing")
    with pytest.raises(
        InteropError,
        match=r"tensor 'vit.encoder.layer.1.output.dense.bias' is missing \(expected shape \(16,\)\)",
    ):
        import_hf(missing)
    shape = copy_with({**tensors, "classifier.bias": torch.zeros(4)}, "shape")
    with pytest.raises(InteropError, match=r"tensor 'classifier.bias' has shape \(4,\); expected \(3,\)"):
        import_hf(shape)
    qkv = copy_with(tensors, "qkv", qkv_bias=False)
    with pytest.raises(ConfigError, match=r"qkv_bias = False cannot be mapped to tformer"):
        import_hf(qkv)
    labels = copy_with(tensors, "labels", id2label={"0": "a", "2": "c"})
    with pytest.raises(ConfigError, match=r"id2label = .*; expected names for ids 0..1"):
        import_hf(labels)
