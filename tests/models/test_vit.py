"""The vision family's models: the two patch embeddings are one function, the config's errors, 2-D
sinusoidal positions, any exact attention backend, and a tiny ViT and the CNN overfitting 64 images."""

import pytest
import torch

from support.images import tiny_vision
from tformer.config import ConfigError, RunConfig, VisionConfig
from tformer.models import build_model
from tformer.models.image_cnn import ImageCNN
from tformer.models.vit import ConvStem, PatchEmbedding, VisionTransformer, sinusoidal_2d_table

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds waiting


def test_patch_embeddings_conv_equals_unfold():
    conv = PatchEmbedding(3, 4, 24, method="conv").double()
    unfold = PatchEmbedding(3, 4, 24, method="unfold").double()
    unfold.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 12, 16, dtype=torch.float64)
    a, b = conv(x), unfold(x)
    assert a.shape == (2, 12, 24)  # (12 / 4) * (16 / 4) patches, row-major
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # patch (row 1, column 2) is the linear map of exactly those pixels
    patch = x[:, :, 4:8, 8:12].reshape(2, -1)
    want = patch @ conv.proj.weight.flatten(1).T + conv.proj.bias
    torch.testing.assert_close(a[:, 1 * 4 + 2], want, rtol=0, atol=1e-12)
    # whole models with the two methods agree on the same weights
    m1 = VisionTransformer(tiny_vision(patch_embedding="conv")).eval()
    m2 = VisionTransformer(tiny_vision(patch_embedding="unfold")).eval()
    m2.load_state_dict(m1.state_dict())
    images = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(m1(images).logits, m2(images).logits, rtol=0, atol=1e-6)


def test_conv_stem_tokens_are_local_and_overlap():
    """Xiao et al.'s stem: the patch grid of tokens, each from a 3x3-of-3x3 receptive field (input rows and
    columns 4r-3 .. 4r+3 for token r at patch_size 4), so neighbouring tokens share pixels, as the
    patchify stem's never do; and the layers are what the paper names, checked against torch's functions."""
    config = tiny_vision(image_size=16, stem="conv")
    assert config.stem_widths == (4, 8) and tiny_vision(stem="conv", stem_channels=(3, 5)).stem_widths == (
        3,
        5,
    )
    model = VisionTransformer(config).double().eval()
    stem = model.patches
    assert isinstance(stem, ConvStem)
    g = torch.Generator().manual_seed(0)
    for module in stem.modules():  # running statistics away from (0, 1), so eval mode's use of them shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64, generator=g)
    tokens = stem(x)
    assert tokens.shape == (2, 16, 16)  # (16 / 4)^2 tokens of d_model 16
    want = x
    for conv, norm in ((stem.convs[0], stem.convs[1]), (stem.convs[3], stem.convs[4])):
        want = torch.nn.functional.conv2d(want, conv.weight, stride=2, padding=1)
        want = torch.nn.functional.batch_norm(
            want, norm.running_mean, norm.running_var, norm.weight, norm.bias
        )
        want = want.relu()
    want = torch.nn.functional.conv2d(want, stem.proj.weight, stem.proj.bias).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, want, rtol=0, atol=1e-12)

    def changed(row: int, col: int) -> set[int]:
        y = x.clone()
        y[:, :, row, col] += 1.0
        return set((stem(y) - tokens).abs().amax(dim=(0, 2)).nonzero().flatten().tolist())

    assert changed(0, 0) == {0}  # only token (0, 0) sees pixel (0, 0)
    assert changed(4, 4) == {5}  # token (1, 1) alone
    assert changed(3, 3) == {0, 1, 4, 5}  # the four tokens around it overlap there
    patchify = VisionTransformer(tiny_vision(image_size=16)).double().eval().patches
    base = patchify(x)
    y = x.clone()
    y[:, :, 3, 3] += 1.0
    assert set((patchify(y) - base).abs().amax(dim=(0, 2)).nonzero().flatten().tolist()) == {0}


def test_config_errors():
    with pytest.raises(ConfigError, match=r"image_size = 30 is not divisible by patch_size = 4; the patches"):
        VisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match=r"max_seq_len = 10, but an image is 50 tokens"):
        VisionConfig(max_seq_len=10)
    with pytest.raises(ConfigError, match=r"positions = 'rotary' is not one of"):
        VisionConfig(positions="rotary")
    with pytest.raises(ConfigError, match=r"'sinusoidal_2d' needs d_model divisible by 4"):
        VisionConfig(positions="sinusoidal_2d", d_model=18, n_heads=2)
    with pytest.raises(
        ConfigError, match=r"architecture = 'lstm' is not available for vision; choose one of"
    ):
        VisionConfig(architecture="lstm")
    with pytest.raises(ConfigError, match=r"cnn_channels has 5 blocks, each halving the image"):
        VisionConfig(architecture="cnn", image_size=16, cnn_channels=(1, 2, 3, 4, 5))
    with pytest.raises(ConfigError, match=r"stem = 'conv' halves the image .* power of two >= 2, got 7"):
        VisionConfig(stem="conv", patch_size=7)
    with pytest.raises(ConfigError, match=r"stem_channels = \[8\]: patch_size 4 needs 2 positive widths"):
        VisionConfig(stem="conv", stem_channels=(8,))
    with pytest.raises(ConfigError, match=r"patch_embedding = 'unfold' is for stem = 'patches'"):
        VisionConfig(stem="conv", patch_embedding="unfold")
    with pytest.raises(ConfigError, match=r"stem_channels is for stem = 'conv'"):
        VisionConfig(stem_channels=(8, 16))
    with pytest.raises(ConfigError, match=r"stem = 'convolution' is not one of"):
        VisionConfig(stem="convolution")
    c = VisionConfig(pooling="mean")
    assert c.max_seq_len == 49 and c.replace(image_size=32).max_seq_len == 64
    assert RunConfig.from_dict(RunConfig(task="vision", model=c).to_dict()).model == c
    c = VisionConfig(stem="conv", stem_channels=(16, 32))
    assert RunConfig.from_dict(RunConfig(task="vision", model=c).to_dict()).model == c


def test_sinusoidal_2d_positions():
    table = sinusoidal_2d_table(3, 8)
    assert table.shape == (9, 8)
    # patches in one row share the first half (the row's sinusoid), one column the second
    assert torch.equal(table[3, :4], table[5, :4]) and torch.equal(table[1, 4:], table[7, 4:])
    model = VisionTransformer(tiny_vision(positions="sinusoidal_2d"))
    assert "positions" not in model.state_dict()  # derived, not saved
    assert torch.equal(model.positions[0, 0], torch.zeros(16))  # [CLS] gets none


def test_backends_and_errors():
    sdpa = VisionTransformer(tiny_vision(dropout=0.0)).eval()
    math = VisionTransformer(tiny_vision(dropout=0.0, attention="math")).eval()
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(sdpa(x).logits, math(x).logits, rtol=1e-5, atol=1e-5)
    out = math(x, need_weights=True)
    assert len(out.attention) == 2 and out.attention[0].shape == (2, 2, 5, 5)
    with pytest.raises(ValueError, match=r"images have shape \(2, 3, 8, 8\); expected \(B, 1, 8, 8\)"):
        sdpa(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match=r"images must be floating point"):
        sdpa(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize(
    "attention, changes, exact",
    [
        ("chunked", {}, True),
        ("local", {"attention_window": 5}, True),  # 5 tokens: a window over all of them is exact
        ("local", {"attention_window": 1}, False),
        ("performer", {}, False),
        ("linformer", {"linformer_rank": 3}, False),
    ],
    ids=["chunked", "local-full", "local-1", "performer", "linformer"],
)
def test_every_backend_runs_the_vit(attention, changes, exact):
    """Every backend of tformer/backends.py behind the ViT: the exact ones (chunked, a window over every
    token) equal the math reference on the same weights; the others train (finite gradients everywhere)
    and differ from it."""
    ref = VisionTransformer(tiny_vision(dropout=0.0, attention="math")).eval()
    model = VisionTransformer(tiny_vision(dropout=0.0, attention=attention, **changes))
    missing = model.load_state_dict(ref.state_dict(), strict=False)
    assert not missing.unexpected_keys
    assert all("linformer" in k or k.endswith(("proj_k", "proj_v")) for k in missing.missing_keys)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want, got = ref(x).logits, model.eval()(x).logits
    if exact:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(got, want, atol=1e-4)
    model.train()
    torch.nn.functional.cross_entropy(model(x).logits, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    "changes",
    [{}, {"stem": "conv"}, {"architecture": "cnn", "cnn_channels": (4,)}],
    ids=["vit", "conv-stem", "cnn"],
)
def test_trains_under_bf16_autocast(changes):
    model = build_model(tiny_vision(**changes))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 1, 8, 8)).logits
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    bf16 = build_model(tiny_vision(**changes)).to(torch.bfloat16)
    assert bf16(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "config",
    [
        tiny_vision(n_classes=4, d_model=32, d_ff=64, dropout=0.0),
        tiny_vision(n_classes=4, d_model=32, d_ff=64, dropout=0.0, pooling="mean", positions="sinusoidal_2d"),
        tiny_vision(n_classes=4, d_model=32, d_ff=64, dropout=0.0, stem="conv"),
        tiny_vision(n_classes=4, architecture="cnn", cnn_channels=(8, 16), dropout=0.0),
    ],
    ids=["vit-cls", "vit-mean-sin2d", "vit-conv-stem", "cnn"],
)
def test_overfits_64_images(config):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    model = build_model(config)
    assert isinstance(model, ImageCNN if config.architecture == "cnn" else VisionTransformer)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(images).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    accuracy = (model(images).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy == 1.0, (accuracy, loss.item())
