"""The CUDA tests (`pytest -m cuda`): every module here is marked `cuda` (`pytestmark`) and its tests take
the `device` fixture.

Where no CUDA GPU is present they skip, saying why. `TFORMER_TEST_DEVICE=cpu` runs the same tests on the
CPU instead (the dry run of benchmarks/gpu_check.sh --cpu, which CI runs), so that the code of the CUDA
tests cannot rot while no GPU is lent: what depends on CUDA itself (nccl, float16 autocast with its
scaler) then takes the CPU's counterpart (gloo, a CPU GradScaler), as each test says.
"""

import os

import pytest
import torch

DRY_RUN = os.environ.get("TFORMER_TEST_DEVICE", "cuda") == "cpu"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The GPU the tests run on (cuda:0), or the CPU in the dry run."""
    if DRY_RUN:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip(
            "needs a CUDA GPU (torch.cuda.is_available() is False); TFORMER_TEST_DEVICE=cpu runs these "
            "tests on the CPU as a dry run"
        )
    return torch.device("cuda", 0)


@pytest.fixture(scope="session")
def bf16(device) -> torch.dtype:
    """bfloat16, where the device computes it (a GPU before Ampere does not: those tests skip)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(device)} has no bfloat16")
    return torch.bfloat16
