"""Compiled decoding kernels by default where this machine measured them faster (tformer.accel.plan's
`decode_path`): `compile=True` compiles and measures, the default (None) follows the cached verdict and
never compiles a shape nobody measured, `compile=False` never compiles."""

from __future__ import annotations

import json

import pytest
import torch

import tformer.accel.compiled as tc
import tformer.accel.linear as tl
from tformer import accel
from tformer.config import LMConfig
from tformer.inference.sampling import generate
from tformer.models.lm import LanguageModel

pytestmark = pytest.mark.skipif(tl._op is None, reason="this PyTorch build has no oneDNN (mkldnn)")

SHAPES = {
    ("decode", "float32", n, k, "streamed") for n, k in ((96, 32), (32, 32), (64, 32), (32, 64), (61, 32))
}


class _ScriptedTuner:
    """A tuner whose measurements give `winner`: `choose` runs each candidate once and caches the scripted
    winner, `lookup` answers from that cache."""

    def __init__(self, winner: str, step: str | None = None) -> None:
        self.winner, self.step = winner, step  # step: the whole decoding step's verdict (None: not cached)
        self.cache: dict[tuple[object, ...], str] = {}
        self.asked: list[tuple[object, ...]] = []
        self.steps: list[tuple[object, ...]] = []

    def choose(self, key, candidates, *, stock):
        if key[0] == "attention":  # float32 attention classes (decision 112): not scripted here
            return stock
        verdict = {"decode": self.winner, "decode-step": self.step}.get(key[0])
        if verdict is None:
            return stock
        assert stock == "eager" and set(candidates) == {"eager", "compiled"}
        for run in candidates.values():
            run()
        (self.asked if key[0] == "decode" else self.steps).append(key)
        self.cache[key] = verdict
        return verdict

    def lookup(self, key, *, stock=None):
        return self.cache.get(key)


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        LMConfig(vocab_size=61, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=32)
    ).eval()


@pytest.fixture
def gemv_calls(monkeypatch):
    """Counts the one-row products the compiled float32 kernel served; every shape may take it (no size
    floor)."""
    seen: list[tuple[int, ...]] = []
    real = tl._gemv

    def counting(x, w, b):
        y = real(x, w, b)
        if y is not None:
            seen.append(tuple(w.shape))
        return y

    monkeypatch.setattr(tl, "_gemv", counting)
    monkeypatch.setattr(tl, "ONEDNN_MIN_MNK", 0)
    return seen


@pytest.mark.parametrize("winner", ["compiled", "eager"])
def test_the_default_follows_what_compile_true_measured(winner, gemv_calls, monkeypatch):
    tuner = _ScriptedTuner(winner)
    monkeypatch.setattr(accel, "_tuner", tuner)
    prompt = torch.randint(61, (1, 5), generator=torch.Generator().manual_seed(1))
    first = accel.apply(_lm())
    plain = generate(first, prompt, max_new_tokens=6, greedy=True)
    assert gemv_calls == [] and tuner.asked == []  # no verdict yet: eager, nothing compiled or timed
    compiled = generate(first, prompt, max_new_tokens=6, greedy=True, compile=True)
    assert torch.equal(plain, compiled) and len(gemv_calls) > 0  # compile=True compiles whatever
    assert set(tuner.asked) == SHAPES  # each weight shape measured once (qkv, out, ff1, ff2, head)
    served = len(gemv_calls)

    # the same model, in the same process, by default takes the verdict measured since its first call
    generate(first, prompt, max_new_tokens=6, greedy=True)
    took = len(gemv_calls) - served
    assert (took > 0) if winner == "compiled" else (took == 0)
    served = len(gemv_calls)

    # a new model (a new process's, reading the machine's cache) by default takes the verdict
    second = accel.apply(_lm())
    again = generate(second, prompt, max_new_tokens=6, greedy=True)
    assert torch.equal(again, plain) and len(set(tuner.asked)) == len(tuner.asked)  # none timed twice
    took = len(gemv_calls) - served
    assert (took > 0) if winner == "compiled" else (took == 0)
    served = len(gemv_calls)
    generate(second, prompt, max_new_tokens=6, greedy=True, compile=False)
    assert len(gemv_calls) == served  # compile=False: never


def test_without_accel_layers_the_default_is_eager_and_compile_true_still_refuses(gemv_calls):
    lm = _lm()
    prompt = torch.tensor([[1, 2, 3]])
    generate(lm, prompt, max_new_tokens=3, greedy=True)
    assert gemv_calls == []
    with pytest.raises(ValueError, match=r"tformer\.accel\.apply\(model\) first"):
        generate(lm, prompt, max_new_tokens=3, greedy=True, compile=True)


def test_int8_weights_are_measured_as_their_own_class(monkeypatch):
    from tformer.inference.precision import apply_precision

    tuner = _ScriptedTuner("compiled")
    monkeypatch.setattr(accel, "_tuner", tuner)
    q = accel.apply(apply_precision(_lm(), "int8"))
    prompt = torch.tensor([[4, 5, 6]])
    plain = generate(q, prompt, max_new_tokens=4, greedy=True, compile=False)
    assert torch.equal(generate(q, prompt, max_new_tokens=4, greedy=True, compile=True), plain)
    assert {key[1] for key in tuner.asked} == {"int8"} and len(tuner.asked) == len(SHAPES)
    assert torch.equal(generate(q, prompt, max_new_tokens=4, greedy=True), plain)  # torchao's bit for bit


def test_the_real_tuner_caches_the_verdict_per_machine(tmp_path, monkeypatch):
    """compile=True through the real Tuner writes a decode entry per weight shape, its winner one of the
    two paths, with both timed; a fresh Tuner on that file answers the default from it."""
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(accel, "_tuner", None)
    monkeypatch.setattr(tl, "ONEDNN_MIN_MNK", 0)
    lm = accel.apply(_lm())
    generate(lm, torch.tensor([[1, 2]]), max_new_tokens=2, greedy=True, compile=True)
    (path,) = tmp_path.glob("accel-*.json")
    entries = json.loads(path.read_text())["entries"]
    decode = {k: v for k, v in entries.items() if json.loads(k)[0] == "decode"}
    assert {tuple(json.loads(k)) for k in decode} == SHAPES
    # float32: timed against F.linear ("eager"); addmv is bfloat16's alone (decision 90)
    assert not any(json.loads(k)[0] == "decode-eager" for k in entries)
    assert all(
        v["stock"] == "eager"
        and v["winner"] in {"eager", "compiled"}
        and set(v["median_s"]) == {"eager", "compiled"}
        for v in decode.values()
    )
    monkeypatch.setattr(accel, "_tuner", None)  # the next process's tuner
    fresh = accel.apply(_lm())
    with torch.no_grad():
        x = torch.randn(1, 1, 32)
        layer = fresh.blocks.layers[0].ff.linear1
        assert (
            layer._accel_plan.decode_path(x, layer.weight, layer.bias, measure=False)
            == (
                decode[json.dumps(["decode", "float32", 64, 32, "streamed"], separators=(",", ":"))]["winner"]
            )
        )


def test_a_long_compile_is_said_once(monkeypatch, capsys):
    monkeypatch.setattr(tc, "_compile_s", 0.0)
    monkeypatch.setattr(tc, "_said", False)
    tc._spent(0.4)
    assert capsys.readouterr().err == ""
    tc._spent(0.8)  # past a second in all: the default's reason, and how to skip it
    err = capsys.readouterr().err
    assert "compiling matrix-vector kernels" in err and "--no-compile" in err
    tc._spent(5.0)
    assert capsys.readouterr().err == ""


def test_the_cli_option_is_three_way():
    from tformer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "ck"]).compile is None
    assert parser.parse_args(["generate", "ck", "--compile"]).compile is True
    assert parser.parse_args(["generate", "ck", "--no-compile"]).compile is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_matrix_vector_path_computes_f_linear(dtype, with_bias):
    """`addmv_row` against float64 on the same (rounded) operands, within the bound of a K-term float32
    sum, gamma_K * sum |x_i w_i| (both ATen kernels accumulate in float32), plus, in bfloat16, the output's
    own rounding (half a unit in the last of its 8 bits)."""
    g = torch.Generator().manual_seed(0)
    n, k = 48, 40
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    x = torch.randn(1, 1, k, generator=g).to(dtype)
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    eps = torch.finfo(torch.float32).eps
    bound = k * eps * (x.double().abs() @ w.double().abs().T) + 1e-30
    if dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0**-8
    got = tl.addmv_row(x, w, b)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    assert ((got.double() - ref).abs() <= bound).all()
    assert (
        (torch.nn.functional.linear(x, w, b).double() - ref).abs() <= bound
    ).all()  # the bound holds for stock


def test_the_matrix_vector_path_is_taken_where_measured_faster(monkeypatch):
    """Where the tuner's "decode-eager" verdict is "addmv", one-row bfloat16 inference products take it
    (no compiling); the cached decoding step's logits equal stock's to bfloat16 tolerance (both sum in
    float32 and round each product to bfloat16; 2 layers). A float32 model never asks (decision 90)."""

    class AddmvTuner(_ScriptedTuner):
        def choose(self, key, candidates, *, stock):
            if key[0] == "attention":  # float32 attention classes (decision 112): not scripted here
                return stock
            if key[0] == "decode-eager":
                assert stock == "eager" and set(candidates) == {"eager", "addmv"}
                for run in candidates.values():
                    run()
                self.asked.append(key)
                return "addmv"
            return super().choose(key, candidates, stock=stock)

    tuner = AddmvTuner("compiled")
    monkeypatch.setattr(accel, "_tuner", tuner)
    served = []
    real = tl.addmv_row
    monkeypatch.setattr(tl, "addmv_row", lambda x, w, b: served.append(tuple(w.shape)) or real(x, w, b))
    f32 = accel.apply(_lm())
    with torch.no_grad():
        f32(torch.tensor([[3, 4]]), cache=f32.new_cache())
        f32(torch.tensor([[5]]), cache=f32.new_cache())
    assert tuner.asked == [] and served == []
    stock, fast = _lm().bfloat16(), accel.apply(_lm().bfloat16())
    ids = torch.randint(61, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = []
        for lm in (stock, fast):
            cache = lm.new_cache()
            lm(ids, cache=cache)
            logits.append(lm(torch.tensor([[7]]), cache=cache).logits)
    assert {key[0] for key in tuner.asked} == {"decode-eager"}  # measured, nothing compiled
    assert {shape for shape in served} == {(96, 32), (32, 32), (64, 32), (32, 64), (61, 32)}
    torch.testing.assert_close(logits[1].float(), logits[0].float(), rtol=0.02, atol=0.02)


def test_a_one_row_products_kernel_is_decided_once_per_class(monkeypatch):
    """After a class's first product, one-row inference takes its kernel without `eager_linear`'s per-call
    checks; the logits equal the stock model's bit for bit (both F.linear)."""
    monkeypatch.setattr(accel, "_tuner", _ScriptedTuner("eager"))
    checks = []
    real = tl.onednn_eligible
    monkeypatch.setattr(tl, "onednn_eligible", lambda *a: checks.append(1) or real(*a))
    stock, fast = _lm(), accel.apply(_lm())
    with torch.no_grad():
        logits = []
        for lm in (stock, fast):
            cache = lm.new_cache()
            lm(torch.tensor([[1, 2, 3]]), cache=cache)
            steps = [lm(torch.tensor([[t]]), cache=cache).logits for t in (4, 5, 6)]
            logits.append(torch.cat(steps, 1))
            if lm is fast:
                first = len(checks)
                lm(torch.tensor([[7]]), cache=cache)
                assert len(checks) == first  # decided: no checks on later steps
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("step", ["compiled", "eager"])
def test_the_default_follows_the_whole_steps_verdict(step, gemv_calls, monkeypatch):
    """compile=True at batch 1 times the model's decoding step as the default takes it against the eager
    step, once; where the step measured slower compiled, the default compiles nothing, though each
    product's kernel alone measured faster (decision 108). Tokens are compile=False's either way."""
    tuner = _ScriptedTuner("compiled", step=step)
    monkeypatch.setattr(accel, "_tuner", tuner)
    prompt = torch.randint(61, (1, 5), generator=torch.Generator().manual_seed(1))
    first = accel.apply(_lm())
    plain = generate(first, prompt, max_new_tokens=6, greedy=True, compile=False)
    assert torch.equal(generate(first, prompt, max_new_tokens=6, greedy=True, compile=True), plain)
    shapes = "float32:32x32,float32:32x64,float32:61x32,float32:64x32,float32:96x32"
    assert tuner.steps == [("decode-step", shapes, "streamed")]  # once, after every product had its verdict
    generate(first, prompt, max_new_tokens=6, greedy=True, compile=True)
    assert len(tuner.steps) == 1  # cached
    served = len(gemv_calls)
    second = accel.apply(_lm())  # another process's model, reading the machine's cache
    assert torch.equal(generate(second, prompt, max_new_tokens=6, greedy=True), plain)
    took = len(gemv_calls) - served
    assert (took > 0) if step == "compiled" else (took == 0)
    assert accel.decoding_setting(second, None) is (None if step == "compiled" else False)
    assert accel.decoding_setting(second, True) is True and accel.decoding_setting(second, False) is False


def test_the_step_is_not_timed_where_no_product_compiles_or_at_batch_8(gemv_calls, monkeypatch):
    tuner = _ScriptedTuner("eager", step="eager")
    monkeypatch.setattr(accel, "_tuner", tuner)
    lm = accel.apply(_lm())
    generate(lm, torch.tensor([[1, 2, 3]]), max_new_tokens=4, greedy=True, compile=True)
    assert len(tuner.asked) == len(SHAPES) and tuner.steps == []  # nothing compiled by default anyway
    tuner.winner = "compiled"
    eight = accel.apply(_lm())
    generate(eight, torch.randint(61, (8, 3)), max_new_tokens=4, greedy=True, compile=True)
    assert tuner.steps == []  # several rows: no one-row products in the step
    generate(eight, torch.tensor([[1, 2, 3]]), max_new_tokens=4, greedy=True, compile=True)
    assert len(tuner.steps) == 1


def test_the_timed_step_leaves_the_callers_cache_alone():
    from tformer.inference.sampling import _trial_step

    lm = accel.apply(_lm(), measure=False)
    with torch.no_grad():
        cache = lm.new_cache(8)
        lm(torch.tensor([[1, 2, 3]]), cache=cache)
        before = [(kv.length, kv.k_buf.clone(), kv.v_buf.clone()) for kv in cache.kv]
        step = _trial_step(lm, torch.tensor([[4]]), cache)
        outs = [step(setting).logits for setting in (False, None, False)]
        after = lm(torch.tensor([[4]]), cache=cache).logits
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[0], after)
    for (length, k, v), kv in zip(before, cache.kv, strict=True):
        assert length == 3 and torch.equal(kv.k_buf[:, :, :3], k[:, :, :3])
        assert torch.equal(kv.v_buf[:, :, :3], v[:, :, :3])


def test_the_real_tuner_keeps_the_steps_verdict(tmp_path, monkeypatch):
    """The step's verdict goes through the machine's Tuner like any class (timed, stored against "eager"),
    and `decoding_setting` reads it back from a fresh Tuner on the same file."""
    import time

    from tformer.accel.tune import Tuner

    monkeypatch.setenv("TFORMER_CACHE_DIR", str(tmp_path))
    lm = accel.apply(_lm())
    key = accel._decoding_key(lm)

    def slow() -> None:
        time.sleep(0.002)

    for verdict, timed in (("compiled", {"eager": slow, "compiled": lambda: None}),
                           ("eager", {"eager": lambda: None, "compiled": slow})):  # fmt: skip
        monkeypatch.setattr(accel, "_tuner", Tuner(tmp_path / f"{verdict}.json"))
        assert accel.tuner().choose(key, timed, stock="eager") == verdict
        monkeypatch.setattr(accel, "_tuner", Tuner(tmp_path / f"{verdict}.json"))  # the next process's
        fresh = accel.apply(_lm())
        assert accel.decoding_setting(fresh, None) is (None if verdict == "compiled" else False)


def test_the_last_level_cache_is_read_from_sysfs_with_a_default(tmp_path):
    from tformer.accel.machine import DEFAULT_LLC_BYTES, last_level_cache_bytes

    for index, (level, size) in enumerate([(1, "32K"), (2, "1024K"), (3, "32768K"), (1, "64K")]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{index}" / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert last_level_cache_bytes(tmp_path / "absent") == DEFAULT_LLC_BYTES
    (tmp_path / "index3" / "size").write_text("many\n")
    assert last_level_cache_bytes(tmp_path) == DEFAULT_LLC_BYTES


def test_one_row_candidates_are_timed_on_copies_of_the_weight_in_turn(monkeypatch):
    """Each timed call reads the next of several copies, enough for twice the last-level cache (at most
    STREAM_COPIES), as a decoding step reads every weight from memory; a weight bigger than that alone."""
    from tformer.accel import plan as plan_module

    monkeypatch.setattr(plan_module, "last_level_cache_bytes", lambda: 64 * 1024)
    weight, bias = torch.randn(64, 32), torch.randn(64)  # 8 KiB: 16 copies make 128 KiB
    turn = plan_module.streamed(weight, bias)
    pairs = [turn() for _ in range(33)]
    assert len({id(w) for w, _ in pairs}) == 16 and pairs[0][0] is weight and pairs[16][0] is weight
    assert all(torch.equal(w, weight) and torch.equal(b, bias) for w, b in pairs)
    big = torch.randn(512, 256)  # 512 KiB
    turn = plan_module.streamed(big, None)
    assert {id(turn()[0]) for _ in range(5)} == {id(big)}
    monkeypatch.setattr(plan_module, "last_level_cache_bytes", lambda: 2**40)  # capped in number
    turn = plan_module.streamed(weight, None)
    assert len({id(turn()[0]) for _ in range(200)}) == plan_module.STREAM_COPIES
