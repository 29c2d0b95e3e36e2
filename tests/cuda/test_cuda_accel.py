"""`tformer.accel` on the GPU leaves the model on PyTorch's own kernels: its machine-specific paths are CPU
paths, so an accelerated CUDA model computes bit for bit what the stock one does (dropout's random draws
included), in float32 and under bfloat16 autocast, training and inference, and records no choice.

Dry run on the CPU: there accel may measure and take its own paths, so the two agree to round-off, with
dropout off (accel's CPU dropout draws its masks its own way).
"""

import pytest
import torch

from support.models import build
from tformer import accel

pytestmark = pytest.mark.cuda


def _pair(device, dropout):
    _, stock = build("translation", dropout=dropout)
    _, fast = build("translation", dropout=dropout)
    fast.load_state_dict(stock.state_dict())
    return stock.to(device), accel.apply(fast.to(device))


def _run(model, device, dtype, seed):
    torch.manual_seed(seed)  # the same inputs and dropout draws for both models
    src = torch.randint(4, 20, (4, 9), device=device)
    tgt = torch.randint(4, 20, (4, 7), device=device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        logits = model(src, tgt).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        inference = model(src, tgt).logits
    model.train()
    return logits.detach(), grads, inference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_accel_leaves_cuda_models_on_torch_kernels(device, bf16, dtype):
    gpu = device.type == "cuda"
    stock, fast = _pair(device, dropout=0.1 if gpu else 0.0)
    assert accel.describe(fast).get("linear:accel", 0) > 0  # applied: the layers did change class
    a = _run(stock, device, dtype, seed=3)
    b = _run(fast, device, dtype, seed=3)
    if gpu:
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
        assert not accel.recorded(fast)  # nothing measured: no CUDA shape class exists
    else:
        tol = 1e-5 if dtype is torch.float32 else 2e-2
        torch.testing.assert_close(a[0], b[0], atol=tol, rtol=0)
        torch.testing.assert_close(a[2], b[2], atol=tol, rtol=0)
        for k in a[1]:
            torch.testing.assert_close(a[1][k], b[1][k], atol=tol, rtol=tol)
