"""`tformer bench train` and `tformer bench generate` at a tiny shape: they run, write JSON / markdown /
PNG with sane values; the weight copies make Hugging Face GPT-2, tformer and the torch stack one function
(when transformers is installed; the tformer rows are tested without it)."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from tformer.bench import common, generate, train
from tformer.bench.common import GPTShape, TorchEncoderLM, markov_tokens
from tformer.cli import main
from tformer.models import LanguageModel

TINY = GPTShape(n_layers=2, n_heads=2, d_model=16, vocab_size=23, block=12, batch=3)
HAVE_HF = train.have_transformers()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and on a busy machine every multi-threaded kernel can wait
    on a stalled thread barrier: run these single-threaded, then restore torch's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=[True, False] if HAVE_HF else [False], ids=["hf", "no-hf"][: 2 if HAVE_HF else 1])
def hf_installed(request, monkeypatch):
    """Run with transformers (when installed) and as if it were not."""
    if not request.param:
        monkeypatch.setattr(train, "have_transformers", lambda: False)

        def missing():
            raise RuntimeError("transformers is not installed: pip install -e .[bench]")

        monkeypatch.setattr(generate, "require_transformers", missing)
    return request.param


def test_train_bench_tiny(tmp_path, hf_installed):
    precisions = ("fp32", "bf16") if hf_installed else ("fp32",)  # keep the second run short
    report = train.run(
        shapes={"tiny": TINY},
        precisions=precisions,
        steps={"tiny": 2},
        loss_steps={"tiny": 6},
        repeats=1,
        compile=False,
        out_dir=tmp_path,
        ceiling_n=128,
    )
    s = report["shapes"]["tiny"]
    models = {r["model"] for r in s["rows"]}
    # every precision also times tformer's model without tformer.accel, to attribute accel's gain
    assert models == {"tformer", "tformer (stock)", "torch-encoder"} | (
        {"hf-gpt2"} if hf_installed else set()
    )
    assert {r["precision"] for r in s["rows"] if r["model"] == "tformer (stock)"} == set(precisions)
    for r in s["rows"]:
        assert r["seconds_per_step"] > 0 and r["mfu"] > 0
        assert r["tokens_per_s"] == pytest.approx(TINY.batch * TINY.block / r["seconds_per_step"])
        # MFU against the median of the ceilings measured at the start and after each round
        assert len(r["ceilings_gflops"]) == 2 and min(r["ceilings_gflops"]) > 0
        flops = TINY.flops_per_token() * TINY.batch * TINY.block
        assert r["mfu"] == pytest.approx(flops / r["seconds_per_step"] / 1e9 / r["ceiling_gflops"])
        assert min(r["ceilings_gflops"]) <= r["ceiling_gflops"] <= max(r["ceilings_gflops"])
    for precision, curves in s["loss_curves"].items():
        # same weights and batches: the three implementations take the same steps
        tol = 1e-4 if precision == "fp32" else 5e-2
        ref = curves["tformer"]
        assert len(ref) == 6 and ref[-1] < ref[0]  # it learns
        for name, curve in curves.items():
            assert max(abs(a - b) for a, b in zip(curve, ref, strict=True)) < tol, name
    assert set(s["loss_curves"]) == set(precisions)
    assert (set(s["max_loss_gap_to_hf"]) == set(precisions)) == hf_installed
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["shapes"]["tiny"]["flops_per_token"] == TINY.flops_per_token()
    table = (tmp_path / "train.md").read_text()
    assert "| tformer | fp32 |" in table and f"| torch-encoder | {precisions[-1]} |" in table
    with Image.open(tmp_path / "train.png") as im:
        assert im.size[0] > 500


def test_generate_bench_tiny(tmp_path, hf_installed):
    report = generate.run(
        shape=TINY, batches=(1, 2), precisions=("fp32",), prompt_len=3, new_tokens=9, repeats=3,
        out_dir=tmp_path, bandwidth_mib=8,
    )  # fmt: skip
    rows = report["rows"]
    assert {r["variant"] for r in rows} >= {"tformer (KV cache)", "tformer (no cache)"}
    stock = [r for r in rows if r["variant"] == "tformer (KV cache, stock)"]
    assert stock and {r["precision"] for r in stock} == {"fp32"}
    assert ("hf generate()" in {r["variant"] for r in rows}) == hf_installed
    lo, hi = report["copy_bandwidth_range_gbs"]
    assert 0 < lo <= report["copy_bandwidth_gbs"] <= hi
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["fraction_of_floor"] > 0
        assert lo <= r["copy_bandwidth_gbs"] <= hi  # measured among the row's own timings
        assert r["floor_tokens_per_s"] == pytest.approx(
            r["batch"] * r["copy_bandwidth_gbs"] * 1e9 / report["weight_bytes_fp32"]
        )
        read_floor = r["batch"] * r["read_bandwidth_gbs"] * 1e9 / report["weight_bytes_fp32"]
        assert r["fraction_of_read_floor"] == pytest.approx(r["tokens_per_s"] / read_floor)
        # decoding steps: timed apart from the prompt's pass, against the same floor (None only where
        # noise exceeded the difference, which the median of 3 repeats keeps rare even at this size)
        if r["decode_step_seconds"] is not None:
            rate = r["batch"] / r["decode_step_seconds"]
            assert r["decode_fraction_of_floor"] == pytest.approx(rate / r["floor_tokens_per_s"])
        # greedy on the same weights: tformer (cached or not) chooses HF's tokens
        assert r["same_tokens_as_hf"] is (True if hf_installed else None)
    assert "| fp32 | 2 | tformer (KV cache) |" in (tmp_path / "generate.md").read_text()
    # a step without a cache re-reads the whole context: far longer than timing noise at any load
    assert all(r["decode_step_seconds"] > 0 for r in rows if r["variant"] == "tformer (no cache)")
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        generate.run(shape=TINY, new_tokens=1, out_dir=tmp_path)
    with Image.open(tmp_path / "generate.png") as im:
        assert im.size[0] > 500


def test_flops_per_token_by_hand():
    # 2 layers x 12 x 16^2 weights + 23 x 16 tied matrix; attention 12 x 2 x 16 x 12
    assert TINY.flops_per_token() == 6 * (2 * 12 * 256 + 23 * 16) + 12 * 2 * 16 * 12


def test_markov_stream_is_seeded_and_follows_its_successors():
    a, b = markov_tokens(30, 500, seed=1), markov_tokens(30, 500, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, markov_tokens(30, 500, seed=2))
    successors = {}
    for x, y in zip(a[:-1].tolist(), a[1:].tolist(), strict=True):
        successors.setdefault(x, set()).add(y)
    assert max(len(s) for s in successors.values()) <= 4


@pytest.mark.skipif(not HAVE_HF, reason="needs transformers (pip install -e .[bench])")
def test_gpt2_weights_copied_give_the_same_logits():
    hf = common.hf_gpt2(TINY, seed=0).double().eval()
    lm = LanguageModel(TINY.lm_config()).double().eval()
    enc = TorchEncoderLM(TINY).double().eval()
    common.gpt2_into_lm(hf, lm)
    common.gpt2_into_torch_encoder(hf, enc)
    ids = torch.randint(23, (2, 12))
    ref = hf(input_ids=ids).logits
    torch.testing.assert_close(lm(ids).logits, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(enc(ids), ref, atol=1e-10, rtol=0)


def test_lm_weights_copied_into_the_torch_encoder_give_the_same_logits():
    torch.manual_seed(0)
    lm = LanguageModel(TINY.lm_config()).double().eval()
    enc = TorchEncoderLM(TINY).double().eval()
    common.lm_into_torch_encoder(lm, enc)
    ids = torch.randint(23, (2, 12))
    torch.testing.assert_close(enc(ids), lm(ids).logits, atol=1e-10, rtol=0)


def test_missing_transformers_error_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[bench\]"):
        common.require_transformers()


def test_cli_rejects_an_unknown_shape(capsys):
    assert main(["bench", "train", "--shapes", "gpt5"]) == 2
    assert "unknown shape 'gpt5'; expected one of baby, gpt2-small" in capsys.readouterr().err


def test_generate_bench_int8_rows(tmp_path):
    """int8 rows: the quantised tformer model, with a floor from int8 weight bytes (smaller than fp32's)."""
    report = generate.run(
        shape=TINY, batches=(1,), precisions=("fp32", "int8"), prompt_len=3, new_tokens=4, repeats=1,
        out_dir=tmp_path, bandwidth_mib=8,
    )  # fmt: skip
    by = {(r["precision"], r["variant"]): r for r in report["rows"]}
    fp32, int8 = by[("fp32", "tformer (KV cache)")], by[("int8", "tformer (KV cache)")]
    assert int8["floor_tokens_per_s"] > fp32["floor_tokens_per_s"]  # fewer bytes per step
    assert ("int8", "hf generate()") not in by
    assert "| int8 | 1 | tformer (KV cache) |" in (tmp_path / "generate.md").read_text()


def test_int8_weight_bytes_by_hand():
    lm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.LayerNorm(3))
    # embedding 40 floats, linear weight 12 int8 + 3 scales, bias 3 floats, norm 6 floats
    assert generate.int8_weight_bytes(lm) == 4 * 40 + 12 + 4 * 3 + 4 * 3 + 4 * 6


def test_bench_device_names_what_is_here(monkeypatch):
    assert common.bench_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
        common.bench_device("gpu0")
    with pytest.raises(ValueError, match="run on cpu or cuda"):
        common.bench_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU here .*use --device cpu"):
        common.bench_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        common.bench_device("cuda:3")
    assert common.bench_device("cuda") == torch.device("cuda", 0)


def test_int8_generation_is_refused_on_a_gpu_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="int8 is CPU-only"):
        generate.run(shape=TINY, precisions=("int8",), out_dir=tmp_path, device=torch.device("cuda"))


def test_the_cli_takes_a_device_and_refuses_a_missing_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for what in ("train", "generate"):
        assert main(["bench", what, "--device", "cuda"]) != 0
        assert "no CUDA GPU here" in capsys.readouterr().err


def test_gpu_shapes_keep_the_names_at_gpu_sizes():
    assert set(train.GPU_SHAPES) == set(train.SHAPES) and train.DEFAULT_SHAPES["cuda"] == ("gpt2-small",)
    gpu, cpu = train.GPU_SHAPES["gpt2-small"], train.SHAPES["gpt2-small"]
    assert (gpu.n_layers, gpu.d_model, gpu.vocab_size) == (cpu.n_layers, cpu.d_model, cpu.vocab_size)
    assert gpu.batch * gpu.block > 20 * cpu.batch * cpu.block


def test_the_timers_wait_for_the_device_around_each_timed_call(monkeypatch):
    """A GPU kernel returns before it has run: every timed call starts and ends with `synchronize`."""
    events: list[str] = []
    monkeypatch.setattr(common, "synchronize", lambda device: events.append(f"sync {device}"))
    common.median_seconds(lambda: events.append("call"), repeats=2, warmup=1, device=torch.device("cpu"))
    assert events == ["call"] + ["sync cpu", "call", "sync cpu"] * 2
    events.clear()
    probe = common.CopyProbe(1, torch.device("cpu"))
    probe.gbs(), probe.read_gbs()
    assert events == ["sync cpu"] * 4
