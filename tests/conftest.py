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


@pytest.fixture(autouse=True)
def _no_decode_graph(request, monkeypatch):
    """compile=True also compiles a batch-1 decoding step as one graph (accel/decode_graph.py), about 15 s
    per tiny model here: the tests of the per-product kernels do not; those marked `decode_graph` do."""
    if request.node.get_closest_marker("decode_graph") is None:
        from tformer.accel import decode_graph

        monkeypatch.setattr(decode_graph, "eligible", lambda model: False)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models of the distributed and export tests: threads only add synchronisation (and stall on a
    busy machine). Spawned ranks run one thread each too. Use with `pytestmark = usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
