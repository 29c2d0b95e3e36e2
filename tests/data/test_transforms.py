"""The vision family's tensor transforms: what each does on a hand-made batch, and determinism by seed
(same generator seed -> same batch; another seed -> another)."""

import numpy as np
import pytest
import torch

from tformer.data.transforms import Augmentation, Normalisation, cutmix, hflip, mixup, random_crop


def _batch(b=6, c=2, h=5, w=7):
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w) / (b * c * h * w)


def test_random_crop_is_a_shifted_window():
    x = _batch()
    assert torch.equal(random_crop(x, 0, np.random.default_rng(0)), x)
    out = random_crop(x, 2, np.random.default_rng(1))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # each image is some 5 x 7 window of its padded self
        windows = [padded[i, :, dy : dy + 5, dx : dx + 7] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], win) for win in windows)


def test_hflip_mirrors_some_images():
    x = _batch(b=32)
    out = hflip(x, np.random.default_rng(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(out[i], x[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 4 < sum(flipped) < 28


@pytest.mark.parametrize("mix", [mixup, cutmix])
def test_mixing_keeps_probabilities(mix):
    x, labels = _batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    targets = torch.nn.functional.one_hot(labels, 3).float()
    out, mixed = mix(x, targets, 1.0, np.random.default_rng(3))
    assert out.shape == x.shape and torch.allclose(mixed.sum(-1), torch.ones(6))
    assert not torch.equal(out, x)


def test_augmentation_is_deterministic_by_seed():
    aug = Augmentation(crop_padding=2, flip=True, mixup=0.4, cutmix=1.0)
    x, labels = _batch(b=8), torch.arange(8) % 4

    def run(seed):
        return aug(x, labels, 4, np.random.default_rng([seed, 0, 3]))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    plain = Augmentation()(x, labels, 4, np.random.default_rng(0))
    assert torch.equal(plain[0], x) and torch.equal(plain[1], labels)  # off: nothing drawn or changed


def test_normalisation():
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    norm = Normalisation.of(x, chunk=7)
    unit = x.double() / 255
    assert torch.allclose(torch.tensor(norm.mean, dtype=torch.float64), unit.mean(dim=(0, 2, 3)))
    assert torch.allclose(
        torch.tensor(norm.std, dtype=torch.float64), unit.std(dim=(0, 2, 3), unbiased=False)
    )
    y = norm(unit.float())
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert Normalisation.from_dict(norm.to_dict(), "x") == norm
    with pytest.raises(ValueError, match=r"ckpt: 'normalisation' needs one positive std per mean"):
        Normalisation.from_dict({"mean": [0.5], "std": [0.0]}, "ckpt")
