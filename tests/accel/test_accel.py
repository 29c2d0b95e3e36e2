"""tformer.accel as a transform: `apply` swaps modules and the attention backend entry in place, keeps
parameters, state-dict keys and results (within float32 summation order), is idempotent and reversible,
and `TFORMER_ACCEL=off` leaves PyTorch's own modules. Also the short low-precision attention kernel it
registers, against float64 and torch's fused kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tformer import accel
from tformer.accel import attention as accel_attention
from tformer.accel.linear import AccelLinear
from tformer.attention import MultiHeadAttention, math_attention, sdpa_attention
from tformer.config import LMConfig, ModelConfig
from tformer.inference.sampling import generate
from tformer.models import LanguageModel, Seq2Seq

H = 4


def _seq2seq() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(
        ModelConfig(src_vocab_size=40, tgt_vocab_size=45, d_model=32, n_heads=H, d_ff=64, n_layers=2)
    )


def _classes(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def test_apply_keeps_parameters_and_keys_and_is_idempotent_and_reversible():
    model = _seq2seq()
    before = _classes(model)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    values = {k: v.clone() for k, v in model.state_dict().items()}
    assert accel.apply(model) is model
    n_linear = sum(t is nn.Linear for t in before)
    n_dropout = sum(t is nn.Dropout for t in before)
    assert n_dropout > 0 and accel.describe(model) == {
        "attention:sdpa_lowp_cpu": 3 * 2,  # encoder self, decoder self and cross, 2 layers each
        "dropout:accel": n_dropout,
        "linear:accel": n_linear,
    }
    after = _classes(model)
    accel.apply(model)
    assert _classes(model) == after  # twice is once
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, values[k])
    accel.revert(model)
    assert _classes(model) == before
    assert {m.backend.name for m in model.modules() if isinstance(m, MultiHeadAttention)} == {"sdpa"}


def test_subclasses_of_linear_are_left_alone():
    """Only exact nn.Linear modules: a subclass (torch's own MultiheadAttention out_proj, an adapter's
    layer) keeps its forward."""
    mha = nn.MultiheadAttention(16, 4)
    accel.apply(mha)
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_results_equal_with_and_without_accel_values_and_gradients():
    model = _seq2seq().eval()  # no dropout; gradients still flow
    src, tgt = torch.randint(1, 40, (3, 7)), torch.randint(1, 45, (3, 6))

    def run():
        model.zero_grad()
        logits = model(src, tgt).logits
        (logits**2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_g = run()
    accel.apply(model)
    got, got_g = run()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_off_gives_stock_modules(monkeypatch):
    monkeypatch.setenv("TFORMER_ACCEL", "off")
    model = _seq2seq()
    before = _classes(model)
    accel.apply(model)
    assert _classes(model) == before and "linear:accel" not in accel.describe(model)
    monkeypatch.setenv("TFORMER_ACCEL", "fast")
    with pytest.raises(ValueError, match="TFORMER_ACCEL='fast': expected 'auto' \\(the default\\) or 'off'"):
        accel.apply(model)


def test_retired_linear_variable_warns(monkeypatch):
    monkeypatch.setenv("TFORMER_LINEAR", "aten")
    with pytest.warns(RuntimeWarning, match="TFORMER_LINEAR is no longer read"):
        accel.apply(nn.Sequential(nn.Linear(2, 2)))


def test_reverted_restores_exactly_what_was_applied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].__class__ = AccelLinear  # only the first
    with accel.reverted(model):
        assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert [type(m) for m in model] == [AccelLinear, nn.Linear]


def test_compile_needs_accelerated_layers():
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_seq_len=16))
    with pytest.raises(ValueError, match="tformer.accel.apply"):
        generate(lm, torch.tensor([[1, 2]]), max_new_tokens=2, greedy=True, compile=True)


def test_cross_attention_rows_and_draws_are_the_packed_layers():
    """Cross-attention's q_proj and kv_proj hold the rows (and the random draws) of the packed in_proj it
    had in tformer <= 0.2, and load a state dict of that layout."""
    torch.manual_seed(0)
    packed = nn.Linear(32, 96)
    torch.manual_seed(0)
    cross = MultiHeadAttention(32, H, cross=True)
    assert torch.equal(cross.q_proj.weight, packed.weight[:32])
    assert torch.equal(cross.kv_proj.weight, packed.weight[32:])
    assert torch.equal(cross.kv_proj.bias, packed.bias[32:])
    old = {
        "in_proj.weight": torch.randn(96, 32),
        "in_proj.bias": torch.randn(96),
        "out_proj.weight": torch.randn(32, 32),
        "out_proj.bias": torch.randn(32),
    }
    cross.load_state_dict(old)  # strict
    weight, bias = cross.in_projection()
    assert torch.equal(weight, old["in_proj.weight"]) and torch.equal(bias, old["in_proj.bias"])


def test_self_and_cross_layers_refuse_the_other_use():
    x = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="cross=True"):
        MultiHeadAttention(16, H)(x, x)
    with pytest.raises(ValueError, match="needs `memory`"):
        MultiHeadAttention(16, H, cross=True)(x)


# --- the short low-precision attention kernel -------------------------------------------------------------
def _lowp_cases():
    """(name, T, S, mask, causal) for bfloat16 attention: the causal fast path, causal with a cache (T < S),
    padding with a fully masked query row, a per-head mask, odd lengths."""
    pad = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    pad[1, ..., 9:] = False
    rows = torch.ones(2, 1, 11, 13, dtype=torch.bool)
    rows[0, 0, 4] = False  # a query row that may attend to nothing
    heads = torch.rand(2, H, 11, 13, generator=torch.Generator().manual_seed(3)) > 0.3
    return [
        ("causal", 37, 37, None, False),
        ("causal-fast", 37, 37, None, True),
        ("cached", 5, 37, None, True),
        ("padding", 11, 13, pad, False),
        ("empty-row", 11, 13, rows, False),
        ("per-head", 11, 13, heads, True),
    ]


@pytest.mark.parametrize("case", _lowp_cases(), ids=lambda c: c[0])
def test_short_lowp_kernel_is_as_accurate_as_the_fused_kernel(case):
    """bfloat16 on the CPU at <= SHORT_LOWP_KEYS keys, through accel's float32-softmax kernel, against torch's
    fused kernel (decision 52). Both are compared with float64 attention on the same bfloat16-rounded
    inputs: ours must be within 1.25x the fused kernel's error (rms, values and gradients) and within
    bfloat16's resolution (2^-8 relative of values of about 1: 0.03 absolute at most)."""
    _, t, s, mask, causal = case
    g = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(2, H, n, 16, generator=g) for n in (t, s, s))
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    w = torch.randn(2, H, t, 16, generator=g)

    def run(fn, *xs):
        out, _ = fn(*xs, mask, causal=causal)
        grads = torch.autograd.grad((out.double() * w).sum(), xs)
        return [out.detach().double(), *(x.double() for x in grads)]

    exact = run(math_attention, *(x.detach().double().requires_grad_() for x in (q, k, v)))
    ours = run(accel_attention.sdpa_lowp_cpu, q, k, v)
    fused = run(sdpa_attention, q, k, v)

    def rms(a, b):
        return float((a - b).pow(2).mean().sqrt())

    for name, o, f, e in zip(("out", "dq", "dk", "dv"), ours, fused, exact, strict=True):
        assert rms(o, e) <= 1.25 * rms(f, e) + 1e-4, (name, rms(o, e), rms(f, e))
        assert float((o - e).abs().max()) <= 0.03 * max(1.0, float(e.abs().max())), name
    if case[0] == "empty-row":
        assert torch.equal(ours[0][0, :, 4], torch.zeros_like(ours[0][0, :, 4]))


def test_short_lowp_kernel_only_where_it_is_faster(monkeypatch):
    """Past SHORT_LOWP_KEYS keys, for float32, and without gradients (decoding, evaluation), the accel
    backend is torch's fused kernel itself."""
    calls = []
    monkeypatch.setattr(accel_attention, "_short_lowp_cpu", lambda *a: calls.append(a) or a[0])
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    for n in (accel_attention.SHORT_LOWP_KEYS, accel_attention.SHORT_LOWP_KEYS + 1):
        k = torch.randn(1, 2, n, 8, dtype=torch.bfloat16)
        accel_attention.sdpa_lowp_cpu(q, k, k)
    x = q.detach().float().requires_grad_()
    accel_attention.sdpa_lowp_cpu(x, x, x)
    k = torch.randn(1, 2, 8, 8, dtype=torch.bfloat16)
    accel_attention.sdpa_lowp_cpu(q.detach(), k, k)  # nothing wants gradients
    with torch.no_grad():
        accel_attention.sdpa_lowp_cpu(q, k, k)
    assert len(calls) == 1 and calls[0][1].shape[-2] == accel_attention.SHORT_LOWP_KEYS


def test_bf16_model_attention_goes_through_the_accel_kernel_when_training(monkeypatch):
    calls = []
    real = accel_attention._short_lowp_cpu
    monkeypatch.setattr(accel_attention, "_short_lowp_cpu", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=16))
    ids = torch.randint(30, (2, 9))
    lm = lm.to(torch.bfloat16).eval()  # no dropout: the same function in both paths
    stock = lm(ids).logits
    stock.float().square().mean().backward()
    want = [p.grad.clone() for p in lm.parameters()]
    assert calls == []
    lm.zero_grad()
    fast = accel.apply(lm)(ids).logits
    fast.float().square().mean().backward()
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(fast.float(), stock.float(), rtol=0.05, atol=0.05)
    for got, ref in zip((p.grad for p in lm.parameters()), want, strict=True):
        torch.testing.assert_close(got.float(), ref.float(), rtol=0.1, atol=0.05)
    with torch.no_grad():
        lm(ids)
    assert len(calls) == 2  # inference: the fused kernel


# --- paths chosen by measurement --------------------------------------------------------------------------
class _FakeTuner:
    """Picks a scripted winner per shape class, and counts what it was asked."""

    def __init__(self, winner: str) -> None:
        self.winner, self.asked = winner, []

    def choose(self, key, candidates, *, stock):
        if key[0] == "attention":  # float32 attention classes (decision 112): not scripted here
            return stock
        if key[0] == "decode-eager":  # a one-row inference product's matrix-vector path: not scripted here
            assert stock == "eager" and set(candidates) == {"eager", "addmv"}
            return stock
        assert stock == "stock" and set(candidates) == {"stock", "onednn"}
        for run in candidates.values():  # each candidate computes the product (and leaves no trace)
            run()
        self.asked.append(key)
        return self.winner

    def lookup(self, key, *, stock=None):  # no cached verdicts (decoding asks for them)
        return None


@pytest.mark.parametrize("winner", ["stock", "onednn"])
def test_each_shape_class_is_measured_once_and_used(winner, monkeypatch):
    from tformer.accel import linear as accel_linear

    fake = _FakeTuner(winner)
    monkeypatch.setattr(accel, "_tuner", fake)
    monkeypatch.setattr(accel_linear, "ONEDNN_MIN_MNK", 0)
    calls = []
    real = accel_linear._op
    monkeypatch.setattr(accel_linear, "_op", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = accel.apply(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    x = torch.randn(5, 8, requires_grad=True)
    ref = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    ref.load_state_dict(model.state_dict())
    for _ in range(3):
        model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    grads = [p.grad.clone() / 3 for p in model.parameters()]  # three identical steps accumulated
    ref(x).sum().backward()
    for a, b in zip(grads, [p.grad for p in ref.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the timing left the gradients alone
    assert [k[2:] for k in fake.asked] == [("train", "2-16", "16x8"), ("train", "2-16", "8x16")]
    with torch.no_grad():
        model(torch.randn(1, 8))
    assert [k[2:] for k in fake.asked[2:]] == [("infer", "1", "16x8"), ("infer", "1", "8x16")]
    assert accel.recorded(model) == {
        f"linear/float32/{mode}/{bucket}/{shape}": winner
        for mode, bucket in (("train", "2-16"), ("infer", "1"))
        for shape in ("16x8", "8x16")
    }
    n_onednn = len(calls)
    model(x).sum().backward()  # no new timing; the chosen path
    assert len(fake.asked) == 4
    assert (len(calls) > n_onednn) == (winner == "onednn")


def test_recorded_choices_are_taken_over_the_machines(monkeypatch):
    """A resumed run gives its recorded choices back: they are used, not re-measured."""
    fake = _FakeTuner("onednn")
    monkeypatch.setattr(accel, "_tuner", fake)
    model = accel.apply(nn.Sequential(nn.Linear(8, 16)))
    accel.apply(model, choices={"linear/float32/infer/>16/16x8": "stock"})
    with torch.no_grad():
        model(torch.randn(20, 8))
    assert fake.asked == [] and accel.recorded(model) == {"linear/float32/infer/>16/16x8": "stock"}
    with pytest.raises(ValueError, match="unknown paths"):
        accel.apply(model, choices={"linear/float32/infer/1/16x8": "mkl"})


def test_the_real_tuner_caches_its_choice_for_the_next_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(accel, "_tuner", None)
    model = accel.apply(nn.Sequential(nn.Linear(64, 64)))
    with torch.no_grad():
        model(torch.randn(32, 64))
    (entry,) = accel.recorded(model).items()
    cache = list(tmp_path.glob("accel-*.json"))
    assert len(cache) == 1 and accel.tuner().lookup(tuple(entry[0].split("/"))) == entry[1]
    monkeypatch.setattr(accel, "_tuner", None)  # a new process: the cached choice, no timing
    again = accel.apply(nn.Sequential(nn.Linear(64, 64)))
    with torch.no_grad():
        again(torch.randn(32, 64))
    assert accel.recorded(again) == dict([entry]) and accel.tuner().spent_s == 0


# --- precision = "auto" -------------------------------------------------------------------------------------
class _Ratio:
    def __init__(self, ratio: float) -> None:
        self.value, self.keys = ratio, []

    def ratio(self, key, fast, base, *, past_budget=False):
        assert past_budget  # the run's precision is never left to the budget
        fast(), base()  # both products run
        self.keys.append(key)
        return self.value


@pytest.mark.parametrize(("ratio", "want"), [(3.0, "bf16"), (2.0, "bf16"), (1.9, "fp32"), (0.2, "fp32")])
def test_auto_precision_follows_the_measured_bf16_speedup(ratio, want):
    from tformer.accel.precision import RATIO_KEY, resolve

    fake = _Ratio(ratio)
    got, why = resolve("auto", "cpu", fake)
    assert got == want and fake.keys == [RATIO_KEY] and f"{ratio:.2g}x" in why
    assert resolve("fp16", "cpu", fake)[0] == "fp16" and len(fake.keys) == 1  # not auto: as given


def test_auto_precision_is_fp32_with_accel_off(monkeypatch):
    from tformer.accel.precision import resolve

    monkeypatch.setenv("TFORMER_ACCEL", "off")
    fake = _Ratio(9.0)
    assert resolve("auto", "cpu", fake) == ("fp32", "TFORMER_ACCEL=off") and fake.keys == []


def _train_lm(tmp_path, **kw):
    from tformer.config import RunConfig
    from tformer.pipeline import train

    (tmp_path / "t.txt").write_text("the cat sat on the mat.\n" * 40)
    config = RunConfig.from_dict(
        {
            "task": "lm",
            "model": {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1, "max_seq_len": 16},
            "data": {"train": [str(tmp_path / "t.txt")], "tokenizer": "char", "valid_fraction": 0.2},
            "train": {"max_steps": kw.pop("steps"), "epochs": 100, "batch_size": 4, "save_every_steps": 2},
        }
    )
    return train(config, tmp_path / "run", progress=False, accel=True, **kw)


def test_a_resumed_run_keeps_what_auto_precision_resolved_to(tmp_path, monkeypatch):
    import tformer.training.trainer as trainer_module
    from tformer.training.checkpoint import load_trainer_state, read_config

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda p, d: ("bf16", "test"))
    monkeypatch.setattr(trainer_module, "confirm_by_step", lambda key, step: ("bf16", "test"))
    first = _train_lm(tmp_path, steps=2)
    saved = first.checkpoint.resolve()
    assert read_config(saved)["train"]["precision"] == "bf16" == load_trainer_state(saved)["precision"]
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda p, d: ("fp32", "test"))
    second = _train_lm(tmp_path, steps=4, resume=True)
    assert read_config(second.checkpoint.resolve())["train"]["precision"] == "bf16"


def test_a_resumed_run_takes_the_kernels_it_chose(tmp_path, monkeypatch):
    """The checkpoint records which kernel each shape class took; a resumed run takes them back although
    this machine would now choose otherwise."""
    import tformer.training.trainer as trainer_module
    from tformer.training.checkpoint import load_trainer_state

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda p, d: ("fp32", "test"))
    monkeypatch.setattr(accel, "_tuner", _FakeTuner("stock"))
    first = _train_lm(tmp_path, steps=2)
    state = load_trainer_state(first.checkpoint.resolve())
    assert (
        state["accel"] == accel.recorded(first.model) and "linear/float32/train/>16/32x16" in state["accel"]
    )
    assert set(state["accel"].values()) == {"stock"}
    now = _FakeTuner("onednn")
    monkeypatch.setattr(accel, "_tuner", now)
    second = _train_lm(tmp_path, steps=4, resume=True)
    assert second.model is not first.model
    after = accel.recorded(second.model)
    assert {k: after[k] for k in state["accel"]} == state["accel"]  # the recorded ones, unchanged
    assert not {"/".join(map(str, key)) for key in now.asked} & set(state["accel"])  # and not re-measured


@pytest.mark.parametrize(("ratio", "want"), [(1.5, "bf16"), (1.1, "bf16"), (1.05, "fp32"), (0.0, "fp32")])
def test_the_model_step_confirms_bf16_only_where_it_is_faster(ratio, want):
    from tformer.accel.precision import confirm_by_step

    fake, ran = _Ratio(ratio), []
    got, why = confirm_by_step(("LanguageModel", 123), ran.append, fake)
    assert got == want and ran == ["bf16", "fp32"] and f"{ratio:.2f}x" in why
    assert fake.keys == [("step", "bfloat16/float32", "LanguageModel", 123)]


class _StepTuner(_FakeTuner):
    """Stock kernels; a scripted bfloat16/float32 ratio for the model's step (the product rule is patched)."""

    def __init__(self, step_ratio: float) -> None:
        super().__init__("stock")
        self.step_ratio, self.steps = step_ratio, []

    def choose(self, key, candidates, *, stock):
        if key[0] == "attention":  # float32 attention classes (decision 112): not scripted here
            return stock
        return stock

    def ratio(self, key, fast, base, *, past_budget=False):
        assert key[0] == "step" and past_budget
        for _ in range(2):  # warm-up and timing, as the tuner calls them
            fast(), base()
        self.steps.append(key)
        return self.step_ratio


@pytest.mark.parametrize(("ratio", "want"), [(1.4, "bf16"), (0.8, "fp32")])
def test_auto_precision_is_confirmed_on_the_models_step_and_leaves_no_trace(
    ratio, want, tmp_path, monkeypatch
):
    """The product rule's bf16 stands only where the model's own step measured faster; the timing's forward
    and backward passes leave the run as it would have been (weights, random streams), and the checkpoint
    records what the run used."""
    import tformer.training.trainer as trainer_module
    from tformer.training.checkpoint import load_trainer_state

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda p, d: ("bf16", "products 4x"))
    fake = _StepTuner(ratio)
    monkeypatch.setattr(accel, "_tuner", fake)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    confirmed = _train_lm(tmp_path / "a", steps=2)
    assert len(fake.steps) == 1 and fake.steps[0][2] == "LanguageModel"
    assert load_trainer_state(confirmed.checkpoint.resolve())["precision"] == want
    # the same precision without any timing step run
    monkeypatch.setattr(trainer_module, "confirm_by_step", lambda key, step: (want, "given"))
    direct = _train_lm(tmp_path / "b", steps=2)
    assert len(fake.steps) == 1
    for (name, a), b in zip(
        confirmed.model.state_dict().items(), direct.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


# --- float32 short attention in training, chosen per key-length class (decision 112) ---------------------
@pytest.mark.parametrize("case", _lowp_cases(), ids=lambda c: c[0])
def test_short_fp32_kernel_is_as_accurate_as_the_fused_kernel(case):
    """float32 through the three products against float64 attention, beside torch's fused kernel: values
    and gradients within 2x the fused kernel's rms error (plus float32's resolution at these sizes)."""
    _, t, s, mask, causal = case
    g = torch.Generator().manual_seed(1)
    q, k, v = ((2 * torch.randn(2, H, n, 16, generator=g)).requires_grad_() for n in (t, s, s))
    w = torch.randn(2, H, t, 16, generator=g)

    def run(fn, *xs):
        out = fn(*xs)
        grads = torch.autograd.grad((out.double() * w).sum(), xs)
        return [out.detach().double(), *(x.double() for x in grads)]

    exact = run(
        lambda *xs: math_attention(*xs, mask, causal=causal)[0],
        *(x.detach().double().requires_grad_() for x in (q, k, v)),
    )
    ours = run(lambda *xs: accel_attention._short_lowp_cpu(*xs, mask, causal, 0.0, None), q, k, v)
    fused = run(lambda *xs: sdpa_attention(*xs, mask, causal=causal)[0], q, k, v)
    for name, o, f, e in zip(("out", "dq", "dk", "dv"), ours, fused, exact, strict=True):
        err, ref = float((o - e).pow(2).mean().sqrt()), float((f - e).pow(2).mean().sqrt())
        assert err <= 2 * ref + 1e-6, (name, err, ref)
    if case[0] == "empty-row":
        assert torch.equal(ours[0][0, :, 4], torch.zeros_like(ours[0][0, :, 4]))


class _AttentionTuner:
    """Scripted winners for attention classes (linear and dropout classes: stock); runs each candidate."""

    def __init__(self, winner: str) -> None:
        self.winner, self.asked = winner, []

    def choose(self, key, candidates, *, stock):
        if key[0] != "attention":
            return stock
        assert stock == "stock" and set(candidates) == {"stock", "short"}
        for run in candidates.values():  # each computes forward and backward on tensors of its own
            dq, dk, dv = run()
            assert dq.shape[-1] == dk.shape[-1] == dv.shape[-1] == 8
        self.asked.append(key)
        return self.winner

    def lookup(self, key, *, stock=None):
        return None


def test_fp32_attention_timing_takes_the_calls_layout(monkeypatch):
    """The timed tensors have the call's strides (attention's transposed views of the projections), so the
    products' copies of a strided q, k, v are timed too; a broadcast view gets a tensor of its own."""
    from tformer.accel import plan as accel_plan

    seen = []
    real = accel_plan.sdpa_attention
    monkeypatch.setattr(
        accel_plan,
        "sdpa_attention",
        lambda q, k, v, *a, **kw: seen.append((q, k, v)) or real(q, k, v, *a, **kw),
    )
    b, t, h, d = 2, 5, 3, 4
    qkv = torch.randn(b, t, 3 * h * d)
    q, k, v = (x.view(b, t, h, d).transpose(1, 2) for x in qkv.split(h * d, dim=-1))
    broadcast = torch.randn(1, h, t, d).expand(b, h, t, d)
    candidates = accel_plan._attention_candidates(q, k, broadcast, None, True, None)
    grads = {name: run() for name, run in candidates.items()}
    ((qs, ks, vs),) = seen
    assert qs.stride() == q.stride() and ks.stride() == k.stride() and not qs.is_contiguous()
    assert vs.shape == broadcast.shape and vs.is_contiguous()
    for got, ref in zip(grads["short"], grads["stock"], strict=True):  # both compute the same gradients
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(LMConfig(vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=160))


@pytest.mark.parametrize("winner", ["stock", "short"])
def test_fp32_attention_class_is_timed_once_and_its_winner_taken(winner, monkeypatch):
    monkeypatch.setattr(accel, "_tuner", _AttentionTuner(winner))
    calls = []
    real = accel_attention._short_lowp_cpu
    monkeypatch.setattr(
        accel_attention, "_short_lowp_cpu", lambda *a: calls.append(a[1].shape[-2]) or real(*a)
    )
    lm = _lm()
    ids = torch.randint(30, (3, 11))
    stock_logits = lm(ids).logits
    stock_logits.square().mean().backward()
    want = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    accel.apply(lm)
    logits = lm(ids).logits  # training mode (dropout 0.0): the first call times "attention/.../keys<=16"
    logits.square().mean().backward()
    assert accel.tuner().asked == [("attention", "float32", "train", "keys<=16")]
    assert accel.recorded(lm)["attention/float32/train/keys<=16"] == winner
    assert calls == ([11] * 3 if winner == "short" else [11])  # the timing's own, then one per layer
    torch.testing.assert_close(logits, stock_logits, rtol=1e-5, atol=1e-6)
    for got, ref in zip((p.grad for p in lm.parameters()), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    lm(torch.randint(30, (2, 14))).logits.sum().backward()  # the same class: no new timing
    lm(torch.randint(30, (2, 40))).logits.sum().backward()  # keys<=64: a class of its own
    assert accel.tuner().asked[1:] == [("attention", "float32", "train", "keys<=64")]
    n = len(calls)
    lm(torch.randint(30, (1, accel_attention.SHORT_FP32_KEYS + 1))).logits.sum().backward()  # too long
    with torch.no_grad():
        lm(ids)  # no gradients (evaluation, decoding): the fused kernel
    assert len(calls) == n and len(accel.tuner().asked) == 2
    # a resumed run takes the recorded choice without timing; a copy keeps a plan of its own
    again = accel.apply(_lm(), choices=accel.recorded(lm))
    again(ids).logits.sum().backward()
    assert len(accel.tuner().asked) == 2
    import copy

    twin = copy.deepcopy(again)
    plans = {id(m.backend.fn.keywords["plan"]) for m in twin.modules() if isinstance(m, MultiHeadAttention)}
    assert plans == {id(accel._plan_of(twin))} and plans != {id(accel._plan_of(again))}


def test_fp32_attention_without_a_plan_or_a_tuner_is_the_fused_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(accel_attention, "_short_lowp_cpu", lambda *a: calls.append(1) or a[0])
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    accel_attention.sdpa_lowp_cpu(q, q, q)  # the registered function itself: no plan
    lm = accel.apply(_lm(), measure=False)
    lm(torch.randint(30, (2, 5))).logits.sum().backward()
    assert calls == [] and accel.recorded(lm)["attention/float32/train/keys<=16"] == "stock"
    with accel.reverted(lm):
        assert {m.backend.name for m in lm.modules() if isinstance(m, MultiHeadAttention)} == {"sdpa"}
    backends = [m.backend for m in lm.modules() if isinstance(m, MultiHeadAttention)]
    assert all(b.fn.func is accel_attention.sdpa_lowp_cpu and "plan" in b.fn.keywords for b in backends)
    with pytest.raises(ValueError, match="attention/...: stock, short"):
        accel.apply(_lm(), choices={"attention/float32/train/keys<=16": "onednn"})
