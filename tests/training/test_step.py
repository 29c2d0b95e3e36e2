"""training/step.py: the optimiser step's mechanics against torch's own (clip_grad_norm_, AdamW) and the
on-device skip of a non-finite step."""

from __future__ import annotations

import pytest
import torch

from tformer.config import TrainConfig
from tformer.training.step import NonfiniteFlag, make_optimizer, scaled_clipped_norm, update


def _model_with_grads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    return model


@pytest.mark.parametrize("clip", [None, 0.0, 0.05])
def test_scaled_clipped_norm_matches_torch(clip):
    ours, ref = _model_with_grads(), _model_with_grads()
    norm = scaled_clipped_norm(ours, 0.5, clip)
    for p in ref.parameters():
        p.grad.mul_(0.5)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip if clip else float("inf"))
    assert float(norm) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    if clip:  # clipped to the norm asked for
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours.parameters()]))
        assert float(total) == pytest.approx(clip, rel=1e-4)


def test_optimizer_is_torchs_adamw_and_skips_a_nonfinite_step_on_the_device():
    config = TrainConfig(weight_decay=0.1)
    model = _model_with_grads()
    ref = _model_with_grads()  # the same parameters and gradients
    opt = make_optimizer(model, config, 1e-2)
    assert opt.defaults["fused"]
    # decay on matrices only
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    rest = [p for p in ref.parameters() if p.dim() < 2]
    ref_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-2,
        betas=config.betas,
        eps=config.eps,
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    update(opt, scaler, torch.tensor(False), fp16=False, mask_on_device=True)
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    skip = torch.tensor(True)
    update(opt, scaler, skip, fp16=False, mask_on_device=True)
    for p, b, m in zip(model.parameters(), before, moments, strict=True):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["exp_avg"], m)  # nothing moved
    assert float(opt.state[next(model.parameters())]["step"]) == 1.0
    assert NonfiniteFlag(skip).read() == (True, False) and NonfiniteFlag(~skip).read() == (False, False)
    assert NonfiniteFlag(~skip, skip).read() == (False, True)  # float16: the scaler's overflow
    assert NonfiniteFlag(skip, skip).read() == (True, False)  # not finite wins: it is counted as such


def test_host_decided_skip_for_an_unfused_optimizer():
    model = _model_with_grads()
    opt = make_optimizer(model, TrainConfig(), 1e-2, fused=False)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    update(opt, scaler, torch.tensor(True), fp16=False, mask_on_device=False)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    update(opt, scaler, torch.tensor(False), fp16=False, mask_on_device=False)
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
