"""`tformer bench train` and `bench generate` on the device (issue 19): the same runs as on the CPU, with
the models, batches, ceiling and bandwidth probe on the GPU and every timing synchronised. In the dry run
(TFORMER_TEST_DEVICE=cpu) they take the explicit-device code path on the CPU."""

import pytest

from tformer.bench import generate, train
from tformer.bench.common import GPTShape

pytestmark = pytest.mark.cuda

TINY = GPTShape(n_layers=2, n_heads=2, d_model=32, vocab_size=29, block=16, batch=2)


def test_train_bench_on_the_device(device, tmp_path):
    report = train.run(
        shapes={"tiny": TINY}, precisions=("fp32", "bf16"), steps={"tiny": 2}, loss_steps={"tiny": 4},
        repeats=1, compile=False, out_dir=tmp_path, ceiling_n=256, device=device,
    )  # fmt: skip
    assert report["device"] == str(device) and ("gpu" in report) == (device.type == "cuda")
    rows = report["shapes"]["tiny"]["rows"]
    assert {r["precision"] for r in rows} == {"fp32", "bf16"}
    assert all(r["seconds_per_step"] > 0 and r["mfu"] > 0 for r in rows)
    curves = report["shapes"]["tiny"]["loss_curves"]["fp32"]
    ref = curves["tformer"]
    for name, curve in curves.items():  # the same weights and batches on the device: the same steps
        assert max(abs(a - b) for a, b in zip(curve, ref, strict=True)) < 1e-4, name
    assert "Matmul ceiling" in (tmp_path / "train.md").read_text()


def test_generate_bench_on_the_device(device, tmp_path):
    report = generate.run(
        shape=TINY, batches=(1, 2), precisions=("fp32", "bf16"), prompt_len=3, new_tokens=5, repeats=1,
        out_dir=tmp_path, bandwidth_mib=8, device=device,
    )  # fmt: skip
    variants = {r["variant"] for r in report["rows"]}
    assert "tformer (KV cache)" in variants
    assert ("tformer (KV cache, compiled)" in variants) == (device.type == "cpu")  # CPU kernels only
    assert all(r["tokens_per_s"] > 0 and r["copy_bandwidth_gbs"] > 0 for r in report["rows"])
    fp32 = [r for r in report["rows"] if r["precision"] == "fp32" and r["same_tokens_as_hf"] is not None]
    assert all(r["same_tokens_as_hf"] for r in fp32)
