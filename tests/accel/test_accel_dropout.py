"""tformer.accel's dropout: the "bits16" mask keeps each element independently with probability k / 2^16
and scales by 2^16 / k (so the expectation is x exactly), its gradient is the same mask and scale, it
draws from torch's generator (seeded runs repeat), and `AccelDropout` takes the path its plan chose per
dtype, timed without disturbing the caller's random stream, recorded for resuming."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tformer import accel
from tformer.accel.dropout import MIN_NUMEL, AccelDropout, bits16_dropout, keep_levels, supported


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_scale_and_expectation(p):
    torch.manual_seed(0)
    n = 1 << 22
    x = torch.full((n,), 3.0)
    y = bits16_dropout(x, p)
    k = keep_levels(p)
    assert k == round((1 - p) * 65536)
    kept = y != 0
    q = k / 65536
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(kept.double().mean().item() - q) < 5 * sigma
    # kept elements are x * 2^16 / k exactly (as float32 rounds it), dropped ones 0
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 3.0 * 65536 / k))
    # each of the four 16-bit lanes of a random word, and neighbouring elements, are alike and independent
    lanes = kept.view(-1, 4).double()
    assert torch.all((lanes.mean(0) - q).abs() < 5 * sigma * 2)
    a, b = kept[:-1].double(), kept[1:].double()
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 5 / math.sqrt(n)


def test_gradient_is_the_mask_and_scale_and_dtypes_keep():
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(37, 53, dtype=dtype).add_(5.0).requires_grad_()  # no zeros in x
        y = bits16_dropout(x, 0.3)
        assert y.dtype == dtype and y.shape == x.shape
        g = torch.randn_like(y)
        y.backward(g)
        scale = 65536 / keep_levels(0.3)
        torch.testing.assert_close(x.grad, (g * (y != 0)).mul_(scale), rtol=0, atol=0)


def test_non_contiguous_input():
    torch.manual_seed(2)
    x = torch.randn(64, 48).t()
    y = bits16_dropout(x, 0.25)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * (65536 / keep_levels(0.25)))


def test_seeded_draws_repeat_and_follow_the_generator():
    x = torch.ones(1000)
    torch.manual_seed(5)
    a = bits16_dropout(x, 0.5)
    torch.manual_seed(5)
    b = bits16_dropout(x, 0.5)
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(bits16_dropout(x, 0.5, g), a)  # the same generator, the same mask
    assert not torch.equal(bits16_dropout(x, 0.5), a)  # the stream moved on


def test_supported():
    x = torch.randn(MIN_NUMEL)
    assert supported(x, 0.1) and supported(x, 0.99)
    assert not supported(x, 0.0) and not supported(x, 1.0) and not supported(x, 1e-6)  # k = 0 or 2^16
    assert not supported(torch.arange(MIN_NUMEL), 0.1) and not supported(x[1:], 0.1)  # ints; too small


class _FakeTuner:
    def __init__(self, winner: str) -> None:
        self.winner, self.asked = winner, []

    def choose(self, key, candidates, *, stock):
        if key[0] == "attention":  # float32 attention classes (decision 112): not scripted here
            return stock
        if key[0] == "linear":
            return "stock"
        assert stock == "stock" and set(candidates) == {"stock", "bits16"}
        for run in candidates.values():  # each candidate computes (forward and backward)
            run()
        self.asked.append(key)
        return self.winner


@pytest.mark.parametrize("winner", ["stock", "bits16"])
def test_the_chosen_path_is_taken_and_timing_leaves_the_random_stream(winner, monkeypatch):
    monkeypatch.setattr(accel, "_tuner", _FakeTuner(winner))
    model = accel.apply(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2)))
    assert type(model[1]) is AccelDropout
    x = torch.randn(MIN_NUMEL // 8 + 3, 8)
    torch.manual_seed(3)
    got = model(x)  # the first call of its class: timed, then computed
    assert accel.recorded(model)["dropout/float32/train"] == winner
    again = accel.apply(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2)), choices=accel.recorded(model))
    again.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    want = again(x)  # recorded choice: no timing
    assert torch.equal(got, want)
    torch.manual_seed(3)
    h = model[0](x)
    expect = F.dropout(h, 0.2, True) if winner == "stock" else bits16_dropout(h, 0.2)
    assert torch.equal(got, expect)
    model(torch.randn(MIN_NUMEL, 8))  # another size: the same class, no new timing
    small = torch.randn(7, 8)
    h = model[0](small)
    torch.manual_seed(4)
    want_small = F.dropout(h, 0.2, True)
    torch.manual_seed(4)
    assert torch.equal(model(small), want_small)  # too small: stock, whatever the class chose
    assert len(accel.tuner().asked) == 1  # once per class (per dtype)


def test_eval_zero_and_inplace_are_stock(monkeypatch):
    monkeypatch.setattr(accel, "_tuner", _FakeTuner("bits16"))
    d = accel.apply(nn.Sequential(nn.Dropout(0.5)))
    x = torch.randn(MIN_NUMEL)
    assert torch.equal(d.eval()(x), x)
    d.train()
    one = accel.apply(nn.Sequential(nn.Dropout(1.0)))
    assert torch.equal(one(x), torch.zeros_like(x))
    inplace = accel.apply(nn.Sequential(nn.Dropout(0.5, inplace=True)))
    torch.manual_seed(4)
    y = inplace(x.clone())
    torch.manual_seed(4)
    assert torch.equal(y, F.dropout(x.clone(), 0.5, True, True))
    assert accel.tuner().asked == []


def test_revert_and_unknown_recorded_paths():
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(3, 3))
    accel.apply(model, measure=False)
    assert [type(m) for m in model] == [AccelDropout, accel.AccelLinear]
    with accel.reverted(model):
        assert [type(m) for m in model] == [nn.Dropout, nn.Linear]
    assert [type(m) for m in model] == [AccelDropout, accel.AccelLinear]
    accel.revert(model)
    assert [type(m) for m in model] == [nn.Dropout, nn.Linear]
    with pytest.raises(ValueError, match="unknown paths.*dropout/...: stock, bits16"):
        accel.apply(model, choices={"dropout/float32/train": "onednn"})


def test_without_a_tuner_dropout_is_stock():
    model = accel.apply(nn.Sequential(nn.Dropout(0.3)), measure=False)
    x = torch.randn(MIN_NUMEL)
    torch.manual_seed(6)
    y = model(x)
    torch.manual_seed(6)
    assert torch.equal(y, F.dropout(x, 0.3, True))
    assert accel.recorded(model) == {"dropout/float32/train": "stock"}
