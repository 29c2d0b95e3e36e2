"""Training on the GPU: bfloat16 autocast follows float32; float16 with the GradScaler skips a step whose
gradient overflowed and lowers the scale; a checkpoint written on one device resumes on the other; the
distributed code over nccl (a process group of one GPU) and `tformer train --nproc 1` equal a plain run.

Dry run (TFORMER_TEST_DEVICE=cpu): float16 training is refused on the CPU by design (`train.precision =
'fp16' needs a CUDA GPU`), so the float16 test lifts that refusal for itself and runs the same steps with
a CPU GradScaler; nccl becomes gloo. Everything else runs as on the GPU.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from support.models import TEXT, build
from tformer.training import Trainer

pytestmark = pytest.mark.cuda

STEPS = 4


def _fit(family, out, device, *, resume=False, **train_kw):
    task, model = build(family, device=device.type, max_steps=train_kw.pop("max_steps", STEPS), **train_kw)
    trainer = Trainer(model, task, task.train_config, out_dir=out, progress=False)
    if resume:
        trainer.resume()
    history = trainer.fit()
    return trainer, history


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _losses(history):
    return [r["loss"] for r in history if r.get("type") == "train"]


@pytest.mark.parametrize("family", ["lm", "translation"])
def test_bf16_training_follows_fp32(tmp_path, device, bf16, family):
    t32, h32 = _fit(family, tmp_path / "fp32", device, precision="fp32", max_steps=8)
    t16, h16 = _fit(family, tmp_path / "bf16", device, precision="bf16", max_steps=8)
    assert next(t16.module.parameters()).device.type == device.type
    assert next(t16.module.parameters()).dtype == torch.float32  # master weights stay float32
    a, b = _losses(h32), _losses(h16)
    assert a and len(a) == len(b)
    for x, y in zip(a, b, strict=True):  # 8 bits of mantissa: close, not equal
        assert abs(x - y) < 0.05 * abs(x) + 0.02, (a, b)


def _allow_fp16_here(monkeypatch, device):
    """The dry run's stand-in for a GPU: float16 autocast with a CPU GradScaler (the trainer refuses it on
    the CPU, rightly: float16 there is slow and pointless; here it exercises the same code)."""
    if device.type == "cuda":
        return
    import tformer.training.trainer as trainer_module

    real = trainer_module.resolve_precision if hasattr(trainer_module, "resolve_precision") else None
    assert real is not None, "the trainer's precision resolver moved: update the dry run's stand-in"

    def resolve(precision, where):
        return ("fp16", "float16 (dry run on the CPU)") if precision == "fp16" else real(precision, where)

    monkeypatch.setattr(trainer_module, "resolve_precision", resolve)
    for name in dir(trainer_module):
        if name.startswith("_check_precision") or name == "check_precision":
            monkeypatch.setattr(trainer_module, name, lambda *a, **k: None)


def test_fp16_gradscaler_skips_an_overflowing_step_and_lowers_the_scale(tmp_path, device, monkeypatch):
    """A finite loss whose gradient overflows (scaled by 1e38 on the way back, as a float16 overflow
    would): the scaler skips that update and halves its scale; the trainer's non-finite-loss skips (the
    trust issue's) stay at zero, and training goes on to its last step."""
    _allow_fp16_here(monkeypatch, device)
    task, model = build("lm", device=device.type, precision="fp16", max_steps=STEPS)
    trainer = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False)
    assert trainer.scaler.is_enabled()
    real_loss, seen = task.loss, {}

    def snapshot():
        return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}

    def loss(m, batch):
        value = real_loss(m, batch)
        if trainer.state.step == 2 and "before" not in seen:
            seen["before"], seen["scale"] = snapshot(), trainer.scaler.get_scale()
            value.total.register_hook(lambda g: g * 1e38)
        elif trainer.state.step == 3 and "after" not in seen:
            seen["after"] = snapshot()
        return value

    task.loss = loss
    trainer.fit()
    assert "before" in seen and "after" in seen, "steps 2 and 3 never ran"
    assert trainer.scaler.get_scale() < seen["scale"]  # the scaler backed off
    assert _max_diff(seen["before"], seen["after"]) == 0.0  # the overflowing update was skipped
    assert trainer.state.step == STEPS and trainer.state.nonfinite_skips == 0
    assert all(torch.isfinite(torch.tensor(_losses(trainer.state.history))))


def _devices(device):
    return [("cpu", device.type), (device.type, "cpu")]


@pytest.mark.parametrize("way", [0, 1], ids=["cpu-to-device", "device-to-cpu"])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path, device, way):
    first, then = (torch.device(d) for d in _devices(device)[way])
    _fit("translation", tmp_path / "straight", then, precision="fp32")
    _fit("translation", tmp_path / "moved", first, precision="fp32", max_steps=STEPS // 2)
    trainer, _ = _fit("translation", tmp_path / "moved", then, precision="fp32", resume=True)
    assert trainer.state.step == STEPS
    assert next(trainer.module.parameters()).device.type == then.type
    for state in trainer.optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.device.type == then.type
    # float32 on two devices sums in other orders: equal to round-off, not bitwise
    assert _max_diff(_weights(tmp_path / "straight"), _weights(tmp_path / "moved")) < 1e-4


def _one_rank(rank, port, device_type, out, result):
    from tformer.training import distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    backend = "nccl" if device_type == "cuda" else "gloo"
    where = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group(backend, rank=0, world_size=1, device_id=where if device_type == "cuda" else None)
    try:
        world = distributed.setup(device_type)
        assert dist.get_backend() == backend and world.size == 1 and world.device.type == device_type
        assert distributed.sum_on_host(world, [1.5, 2.0]) == [1.5, 2.0]
        assert distributed.from_rank0(world, {"a": 1}) == {"a": 1}
        distributed.barrier(world)
        t = torch.ones(3, device=world.device)
        dist.all_reduce(t)  # through nccl on the GPU
        assert t.tolist() == [1.0, 1.0, 1.0]
        task, model = build("lm", device=device_type, precision="fp32", max_steps=STEPS)
        Trainer(model, task, task.train_config, out_dir=Path(out), progress=False).fit()
        # DDP over the group of one: a step equals the plain module's
        torch.manual_seed(0)
        net = torch.nn.Linear(8, 4).to(where)
        ddp = distributed.wrap(torch.nn.Linear(8, 4).to(where), world, "ddp")
        distributed.unwrap(ddp).load_state_dict(net.state_dict())
        x = torch.randn(5, 8, device=where)
        net(x).square().sum().backward()
        ddp(x).square().sum().backward()
        g_ddp = distributed.unwrap(ddp).weight.grad
        result.put(float((net.weight.grad - g_ddp).abs().max()))
    finally:
        dist.destroy_process_group()


def test_distributed_code_over_nccl_with_one_gpu_equals_a_plain_run(tmp_path, device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    mp.start_processes(
        _one_rank, args=(port, device.type, str(tmp_path / "group"), result), nprocs=1, join=True,
        start_method="spawn",
    )  # fmt: skip
    assert result.get(timeout=10) < 1e-6
    _fit("lm", tmp_path / "plain", device, precision="fp32")
    assert _max_diff(_weights(tmp_path / "plain"), _weights(tmp_path / "group")) < 1e-5


def test_tformer_train_nproc_1_equals_a_plain_run(tmp_path, device):
    """`tformer train --nproc 1` (torchrun, one process) against the same command without it."""
    (tmp_path / "t.txt").write_text(TEXT * 4)
    base = [
        sys.executable,
        "-m",
        "tformer",
        "train",
        "lm",
        "--train",
        str(tmp_path / "t.txt"),
        "--no-progress",
    ]
    base += ["data.valid_fraction=0.1", "data.tokenizer=char", "model.d_model=32", "model.n_heads=4"]
    base += ["model.d_ff=64", "model.n_layers=2", "model.max_seq_len=32", "train.max_steps=3"]
    base += ["train.batch_size=4", f"train.device={device.type}", "train.precision=fp32", "train.seed=5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, extra in (("plain", []), ("torchrun", ["--nproc", "1"])):
        subprocess.run([*base, "--out", str(tmp_path / name), *extra], check=True, env=env, timeout=300)
    assert _max_diff(_weights(tmp_path / "plain"), _weights(tmp_path / "torchrun")) < 1e-5
