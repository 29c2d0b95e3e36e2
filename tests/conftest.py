import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: a fast, derandomized profile by default (the same examples every run, no example
# database), and a long randomized one for `TFORMER_FUZZ=long pytest -m fuzz`.
settings.register_profile(
    "fast",
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("TFORMER_FUZZ", "fast"))

# tformer.accel's tuner caches its measurements per machine in the user's cache directory: the tests (and
# the processes they start) measure into a directory of their own, empty at the start as in CI.
os.environ["TFORMER_CACHE_DIR"] = tempfile.mkdtemp(prefix="tformer-test-cache-")


def _precision_auto_is_fp32() -> None:
    """The cache says bfloat16 is no faster than float32 here, so `precision = "auto"` (TrainConfig's
    default) trains in float32 on every machine the tests run on; tests of "auto" itself use their own
    cache. (A fake clock: both products "take" the same time.)"""
    import torch

    from tformer.accel.precision import RATIO_KEY
    from tformer.accel.tune import Tuner

    ticks = iter(range(10**6))
    threads = torch.get_num_threads()
    try:  # the fingerprint counts torch's threads: every count a test process may set
        for n in sorted({1, 2, threads, os.cpu_count() or 1}):
            torch.set_num_threads(n)
            Tuner(timer=lambda: float(next(ticks))).ratio(RATIO_KEY, fast=lambda: None, base=lambda: None)
    finally:
        torch.set_num_threads(threads)


_precision_auto_is_fp32()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def copy_mha(ours, ref):
    """Copy torch.nn.MultiheadAttention's packed in-projection (rows q, k, v) into ours: self-attention's
    one `in_proj`, or cross-attention's `q_proj` and `kv_proj`."""
    import torch

    with torch.no_grad():
        if ours.cross:
            c = ours.d_model
            ours.q_proj.weight.copy_(ref.in_proj_weight[:c])
            ours.q_proj.bias.copy_(ref.in_proj_bias[:c])
            ours.kv_proj.weight.copy_(ref.in_proj_weight[c:])
            ours.kv_proj.bias.copy_(ref.in_proj_bias[c:])
        else:
            ours.in_proj.weight.copy_(ref.in_proj_weight)
            ours.in_proj.bias.copy_(ref.in_proj_bias)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


def in_proj_grads(ours):
    """Our attention's in-projection gradients as torch's packed (weight, bias), rows q, k, v."""
    if ours.cross:
        return (
            torch.cat([ours.q_proj.weight.grad, ours.kv_proj.weight.grad]),
            torch.cat([ours.q_proj.bias.grad, ours.kv_proj.bias.grad]),
        )
    return ours.in_proj.weight.grad, ours.in_proj.bias.grad


def copy_ff_norms(ours, ref, n_norms):
    with torch.no_grad():
        ours.ff.linear1.load_state_dict(ref.linear1.state_dict())
        ours.ff.linear2.load_state_dict(ref.linear2.state_dict())
        for i in range(1, n_norms + 1):
            getattr(ours, f"norm{i}").load_state_dict(getattr(ref, f"norm{i}").state_dict())


def copy_encoder_layer(ours, ref):
    copy_mha(ours.self_attn, ref.self_attn)
    copy_ff_norms(ours, ref, 2)


def copy_decoder_layer(ours, ref):
    copy_mha(ours.self_attn, ref.self_attn)
    copy_mha(ours.cross_attn, ref.multihead_attn)
    copy_ff_norms(ours, ref, 3)
