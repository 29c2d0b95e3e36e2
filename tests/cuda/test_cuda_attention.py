"""Attention on the GPU: MultiHeadAttention against torch.nn.MultiheadAttention on copied weights, and
every exact backend against `math`, in float32 and bfloat16.

Tolerances. float32: within 2e-5 of float64 math on the CPU (values of order 1; cuBLAS and SDPA's kernels
sum in another order than the CPU, TF32 is off for matmuls by PyTorch's default). bfloat16 (8 bits of
mantissa): no more than twice the error of torch's own layer in bfloat16 on the same weights and inputs,
plus 4e-3, both measured against float64 truth; so the test fails if ours rounds worse than PyTorch's.
"""

import pytest
import torch

from support.weights import copy_mha
from tformer.attention import MultiHeadAttention, causal_mask, padding_mask
from tformer.attention.local import reference_mask

pytestmark = pytest.mark.cuda

B, T, S, C, H = 3, 17, 23, 64, 4
FP32_TOL = 2e-5


def _inputs(device, dtype, cross):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    memory = torch.randn(B, S, C, generator=g, dtype=torch.float64) if cross else None
    ids = torch.randint(3, 9, (B, S if cross else T), generator=g)
    ids[1, -5:] = 0  # padding in one row
    keep = padding_mask(ids, 0)  # (B, 1, 1, S)
    return x, memory, keep


def _error(out, truth):
    return (out.double().cpu() - truth).abs().max().item()


@pytest.mark.parametrize(("cross", "causal"), [(False, False), (False, True), (True, False)])
def test_multihead_attention_matches_torch_float32_and_bf16(device, bf16, cross, causal):
    ours = MultiHeadAttention(C, H, backend="sdpa", cross=cross).double().eval()
    ref = torch.nn.MultiheadAttention(C, H, batch_first=True).double().eval()
    copy_mha(ours, ref)
    x, memory, keep = _inputs("cpu", torch.float64, cross)
    kv = x if memory is None else memory
    ref_mask = ~keep[:, 0, 0, :]  # torch: True = padding
    attn_mask = ~causal_mask(T) if causal else None
    with torch.no_grad():
        truth = ref(x, kv, kv, key_padding_mask=ref_mask, attn_mask=attn_mask, need_weights=False)[0]
        for dtype, tol in ((torch.float32, None), (bf16, "relative")):
            o, r = ours.to(device, dtype), ref.to(device, dtype)
            xs = x.to(device, dtype)
            ms = None if memory is None else memory.to(device, dtype)
            got = o(xs, ms, mask=keep.to(device), causal=causal).out
            kvs = xs if ms is None else ms
            theirs = r(
                xs,
                kvs,
                kvs,
                key_padding_mask=ref_mask.to(device),
                attn_mask=None if attn_mask is None else attn_mask.to(device),
                need_weights=False,
            )[0]
            assert got.device.type == device.type and got.dtype == dtype
            # padded query rows of a causal self-attention see real keys only: every row is compared
            if tol is None:
                assert _error(got, truth) < FP32_TOL
                assert _error(theirs, truth) < FP32_TOL
            else:
                ref_err = _error(theirs, truth)
                assert ref_err < 0.1
                assert _error(got, truth) <= 2 * ref_err + 4e-3
            ours.double().cpu()
            ref.double().cpu()


def _exact_backends():
    from tformer.backends import BACKENDS, EXACT

    return [name for name, b in BACKENDS.items() if b.scores == EXACT and name != "math"]


@pytest.mark.parametrize("backend", _exact_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_exact_backends_equal_math_on_the_device(device, bf16, backend, causal):
    """Every backend that computes softmax(q k^T) v exactly (sdpa, chunked, local within its band) gives
    math's output and input gradient, with math given the same band where the backend has one."""
    torch.manual_seed(0)
    options = {"window": 5} if backend == "local" else {}
    mha = MultiHeadAttention(C, H, backend=backend, backend_options=options).to(device)
    ref = MultiHeadAttention(C, H, backend="math").to(device)
    ref.load_state_dict(mha.state_dict())
    x, _, keep = _inputs(device, torch.float32, cross=False)
    mask = keep.to(device)
    band = reference_mask(T, T, causal=causal, device=device, **options) if backend == "local" else None
    ref_mask = mask if band is None else mask & band
    for dtype in (torch.float32, bf16):
        xs = x.to(device, torch.float32).requires_grad_()
        xr = xs.detach().clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is bf16):
            got = mha(xs, mask=mask, causal=causal).out
            want = ref(xr, mask=ref_mask, causal=causal).out
        g = torch.randn_like(got)
        (got * g).sum().backward()
        (want * g).sum().backward()
        tol = 1e-5 if dtype is torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)
        torch.testing.assert_close(xs.grad, xr.grad, atol=tol, rtol=0)
