"""tformer.accel.linear: the oneDNN path computes nn.Linear's function (values and gradients, against
float64), is taken where it should be and nowhere else, and is gone once reverted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tformer.accel.bucket as tb
import tformer.accel.compiled as tc
import tformer.accel.linear as tl
from tformer import accel
from tformer.accel.linear import AccelLinear
from tformer.accel.linear import accel_linear as linear


def Linear(n_in: int, n_out: int, bias: bool = True) -> nn.Linear:  # noqa: N802 - a layer, as nn.Linear
    """nn.Linear(n_in, n_out) given tformer.accel's paths."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    layer.__class__ = AccelLinear
    return layer


pytestmark = pytest.mark.skipif(tl._op is None, reason="this PyTorch build has no oneDNN (mkldnn)")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach oneDNN; the tests' small products take the oneDNN path (no size floor)."""
    seen: list[tuple[int, ...]] = []
    real = tl._op

    def counting(x, w, b, *rest):
        seen.append(tuple(x.shape))
        return real(x, w, b, *rest)

    monkeypatch.setattr(tl, "_op", counting)
    monkeypatch.setattr(tl, "ONEDNN_MIN_MNK", 0)
    return seen


def test_small_products_stay_on_f_linear(calls, monkeypatch):
    """Below ONEDNN_MIN_MNK multiply-adds a product is F.linear's (oneDNN's call overhead would dominate);
    from it on, oneDNN's, forward and backward."""
    monkeypatch.setattr(tl, "ONEDNN_MIN_MNK", 1 << 19)
    small = Linear(128, 128)
    x = torch.randn(1, 128, requires_grad=True)
    small(x).sum().backward()
    assert calls == []
    big = Linear(512, 1024)  # 1 x 1024 x 512 = 2^19
    y = big(torch.randn(1, 512, requires_grad=True))
    y.sum().backward()
    assert len(calls) == 3


def _reference(x, w, b, grad):
    """Float64 F.linear and its gradients, as float32 for comparison."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y = F.linear(x64, w64, b64)
    y.backward(grad.double())
    grads = [x64.grad, w64.grad] + ([] if b64 is None else [b64.grad])
    return [t.float() for t in (y, *grads)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 33), (3, 1, 4, 33)])
def test_values_and_gradients_equal_float64(shape, bias, calls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    layer = Linear(33, 19, bias=bias)
    grad = torch.randn(*shape[:-1], 19, generator=g)
    y = layer(x)
    y.backward(grad)
    got = [y, x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
    want = _reference(x, layer.weight, layer.bias, grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3  # forward, dx, dW: all three products in oneDNN


def test_non_contiguous_input_and_frozen_weight(calls):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 9, 16, generator=g)
    x = base[:, ::2].transpose(0, 1).requires_grad_()  # strided, not contiguous
    layer = Linear(16, 8)
    layer.weight.requires_grad_(False)
    grad = torch.randn(5, 4, 8, generator=g)
    y = layer(x)
    y.backward(grad)
    want = _reference(x, layer.weight, layer.bias, grad)
    torch.testing.assert_close(y, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, want[1], rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and layer.bias.grad is not None
    assert len(calls) == 2  # forward and dx; no dW for a frozen weight


def test_no_grad_calls_onednn_directly(calls):
    layer = Linear(12, 6)
    with torch.no_grad():
        y = layer(torch.randn(3, 12))
    assert y.grad_fn is None and len(calls) == 1


def test_same_state_dict_as_nn_linear():
    torch.manual_seed(0)
    a = nn.Linear(10, 4)
    torch.manual_seed(0)
    b = Linear(10, 4)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])  # the same initialisation


@pytest.mark.parametrize(
    "case",
    ["float64", "bfloat16", "autocast", "stock", "one-dim"],
)
def test_falls_back_to_f_linear(case, calls):
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    if case == "float64":
        layer, x = layer.double(), x.double()
    if case == "bfloat16":
        layer, x = layer.bfloat16(), x.bfloat16()
    if case == "one-dim":
        x = x[0]
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            assert y.dtype == torch.bfloat16  # autocast still decides the precision
            assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
        y = y.float()
    elif case == "stock":
        accel.revert(layer)
        assert type(layer) is nn.Linear
        y = layer(x)
    else:
        y = layer(x)
    if case != "autocast":
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
    assert calls == []


def test_quantised_weight_keeps_its_kernel(calls):
    """A weight that is a tensor subclass (torchao's int8, FSDP's DTensor) is left to its own F.linear."""

    class Tagged(torch.Tensor):
        pass

    w = torch.randn(4, 8).as_subclass(Tagged)
    x = torch.randn(2, 8)
    torch.testing.assert_close(
        linear(x, w).as_subclass(torch.Tensor), F.linear(x, w.as_subclass(torch.Tensor))
    )
    assert calls == []


def test_model_logits_equal_with_and_without_accel():
    """A whole model gives the same logits through oneDNN and through F.linear (summation order only)."""
    from tformer.config import LMConfig
    from tformer.models.lm import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(
        LMConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=16)
    ).eval()
    ids = torch.randint(50, (2, 16))
    with torch.no_grad():
        slow = lm(ids).logits
        fast = accel.apply(lm)(ids).logits
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_compiled_gemv_generates_the_same_tokens(calls):
    """compile=True: one-row decoding steps run compiled matrix-vector kernels (not oneDNN), and greedy
    decoding chooses the same tokens with logits equal to float64's at float32 tolerance."""
    from tformer.config import LMConfig
    from tformer.inference.sampling import generate
    from tformer.models.lm import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(
        LMConfig(vocab_size=61, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=32)
    ).eval()
    accel.apply(lm, measure=False)  # the fixed rule: no timing calls among the counted ones
    prompt = torch.randint(61, (1, 5))
    plain = generate(lm, prompt, max_new_tokens=8, greedy=True)
    n_plain = len(calls)
    compiled = generate(lm, prompt, max_new_tokens=8, greedy=True, compile=True)
    assert torch.equal(plain, compiled)
    # only the prompt pass's 2 x 4 layer products (5 rows each) still go to oneDNN; every one-row product
    # (its last-position output projection, and all of the 7 steps after it) is compiled
    assert n_plain == 8 + 1 + 7 * 9 and len(calls) - n_plain == 8
    x = torch.randn(1, 1, 32, dtype=torch.float64)
    layer = lm.blocks.layers[0].ff.linear1
    with torch.no_grad(), tl.compiled_decoding():
        got = layer(x.float())
    want = F.linear(x, layer.weight.double(), layer.bias.double())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_compiled_gemv_falls_back_when_compiling_fails(monkeypatch, calls):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(tc, "_gemv_fns", {})
    monkeypatch.setattr(tc, "_gemv_broken", None)
    monkeypatch.setattr(torch._inductor, "compile", broken)
    layer = Linear(16, 8)
    x = torch.randn(1, 16)
    with (
        torch.no_grad(),
        tl.compiled_decoding(),
        pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"),
    ):
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
    assert len(calls) == 1  # served by oneDNN
    with torch.no_grad(), tl.compiled_decoding():
        layer(x)  # no second warning: the failure is remembered
    assert len(calls) == 2


def test_compiled_gemv_takes_strided_rows_and_leaves_other_weights_to_onednn(calls, recwarn):
    """The compiled kernels are fixed to their first call's strides (no dynamo guards, decision 56): a row
    that is a strided view (the last position of a sequence) is made contiguous first, a transposed
    weight goes to oneDNN, and neither disables the compiled path or warns. A wrong inner size gets
    F.linear's own error (which names the shapes), not a compiler failure or oneDNN's unnamed one."""
    torch.manual_seed(0)
    w, b = torch.randn(24, 16), torch.randn(24)
    seq = torch.randn(1, 5, 32)[..., ::2]  # (1, 5, 16), last-dim stride 2
    with torch.no_grad(), tl.compiled_decoding():
        got = linear(seq[:, -1:], w, b)  # a strided one-row view
        torch.testing.assert_close(got, F.linear(seq[:, -1:], w, b), rtol=1e-5, atol=1e-5)
        assert got.shape == (1, 1, 24) and calls == []  # the compiled kernel served it
        wt = torch.randn(16, 24).t()  # (24, 16), not contiguous
        torch.testing.assert_close(
            linear(seq[:, -1:], wt, b), F.linear(seq[:, -1:], wt, b), rtol=1e-5, atol=1e-5
        )
        assert len(calls) == 1  # oneDNN took it
        with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied \(1x17 and 16x24\)"):
            linear(torch.randn(1, 1, 17), w, b)
        with pytest.raises(
            RuntimeError, match=r"size of the tensor \(24\) must match the existing size \(23\)"
        ):
            linear(torch.randn(1, 1, 16), w, torch.randn(23))  # a bias of the wrong size: F.linear's error
        with pytest.raises(RuntimeError, match="meta"):  # a bias on another device: F.linear's error
            linear(torch.randn(1, 1, 16), w, torch.empty(24, device="meta"))
        linear(torch.randn(1, 16), w, b)  # still compiled
    assert tc._gemv_broken is None and len(calls) == 1  # the wrong-size call went to F.linear
    assert not [x for x in recwarn if issubclass(x.category, RuntimeWarning)]


def _built(key: tuple) -> bool:
    """The compiled kernel for `key` exists and compiled (not just registered), and nothing failed."""
    kernel = tc._gemv_fns.get(key)
    return kernel is not None and kernel.fn is not None and tc._gemv_broken is None


def test_compiled_int8_gemv_leaves_what_it_does_not_compute_to_torchao():
    """The compiled int8 kernels are fixed to float32 CPU biases and carry no autograd: a bias of another
    dtype, or a bias that requires grad while grad is enabled, goes to torchao's own kernel (the same
    function, and the gradient kept), and neither turns the compiled path off."""
    ref, q = _torchao_int8("Int8WeightOnlyConfig", 40, 96, True)
    x = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(2))
    with tl.compiled_decoding():
        with torch.no_grad():
            first = linear(x, q.weight, q.bias)  # compiles the kernel for a float32 bias
            half = q.bias.detach().to(torch.bfloat16)
            torch.testing.assert_close(linear(x, q.weight, half), F.linear(x, q.weight, half))
        y = linear(x, q.weight, q.bias)  # grad enabled, the bias requires grad: torchao's path
        assert y.requires_grad
        y.sum().backward()
        torch.testing.assert_close(q.bias.grad, torch.ones(40))
        torch.testing.assert_close(y.detach(), first, rtol=1e-6, atol=1e-6)
    assert _built(("_int8_gemv_eager", 40, 96, True))


def test_compiled_gemv_compiles_from_several_threads():
    """make_fx and inductor are not thread-safe: first calls of different shapes from four threads at once
    are compiled one at a time (a lock), each correct, with the compiled path still on. (Each thread turns
    it on: the setting is per thread.)"""
    import threading

    torch.manual_seed(0)
    cases = [(torch.randn(8 + i, 16), torch.randn(8 + i), torch.randn(1, 16)) for i in range(4)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        w, b, x = cases[i]
        try:
            with torch.no_grad(), tl.compiled_decoding():
                results[i] = linear(x, w, b)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    saved = tl.ONEDNN_MIN_MNK
    tl.ONEDNN_MIN_MNK = 0
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        tl.ONEDNN_MIN_MNK = saved
    assert not errors
    for i, (w, b, x) in enumerate(cases):
        torch.testing.assert_close(results[i], F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert _built(("_gemv_eager", 8 + i, 16, True))


def _torchao_int8(config_name: str, n: int, k: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    """A float32 nn.Linear and its torchao-quantised copy."""
    import copy
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao.quantization as ao

    torch.manual_seed(0)
    ref = nn.Linear(k, n, bias=bias).eval()
    q = copy.deepcopy(ref)
    ao.quantize_(q, getattr(ao, config_name)())
    return ref, q


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config_name", ["Int8DynamicActivationInt8WeightConfig", "Int8WeightOnlyConfig"])
def test_compiled_int8_gemv_is_torchaos_function(config_name, bias):
    """A one-row product with a torchao int8 weight, compiled (reading 1 byte per weight), equals torchao's
    own int8 linear. With dynamic activations exactly: the row is quantised by torchao's functions, the
    integer dot products are exact in float32 at K = 96 (96 x 127 x 128 < 2^24) and the rescaling is
    done in torchao's order; bit-equality matters because activation rounding is discontinuous, so a
    last-bit difference upstream can flip a rounding downstream and part a greedy decoding from
    torchao's. Weight-only: float dot products, equal up to summation order. Neither is near the float32
    layer at these tolerances, so the test does see which function was computed."""
    ref, q = _torchao_int8(config_name, 40, 96, bias)
    x = 3 * torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = F.linear(x, q.weight, q.bias)  # torchao's kernel
        with tl.compiled_decoding():
            got = linear(x, q.weight, q.bias)
        assert _built(("_int8_gemv_eager", 40, 96, bias))  # the compiled kernel served it
        exact = config_name == "Int8DynamicActivationInt8WeightConfig"
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
        assert (want - ref(x)).abs().max() > 1e-3  # int8 rounding is visible: the two are not float32's


def test_int8_model_generates_the_same_tokens_compiled():
    """An int8 LM (--precision int8) decodes the same tokens with compile=True as torchao's kernels give,
    with the same logits at every step (bit for bit: see the test above)."""
    import copy

    from tformer.config import LMConfig
    from tformer.inference.precision import apply_precision
    from tformer.inference.sampling import generate
    from tformer.models.lm import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(
        LMConfig(vocab_size=61, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=32)
    ).eval()
    q = accel.apply(apply_precision(copy.deepcopy(lm), "int8"))
    prompt = torch.randint(61, (1, 5))
    # compile=True once before: its first run also times whole decoding steps (accel.confirm_decoding)
    generate(q, prompt, max_new_tokens=2, greedy=True, compile=True)
    logits: list[torch.Tensor] = []
    hook = q.output.register_forward_hook(lambda m, i, o: logits.append(o.detach().clone()))
    plain = generate(q, prompt, max_new_tokens=8, greedy=True)
    compiled = generate(q, prompt, max_new_tokens=8, greedy=True, compile=True)
    hook.remove()
    assert torch.equal(plain, compiled)
    for a, b in zip(logits[:8], logits[8:], strict=True):
        assert torch.equal(a, b)
    assert any(
        key[0] == "_int8_gemv_eager" and key[1] == 61 and _built(key) for key in tc._gemv_fns
    )  # the head


@pytest.mark.parametrize("setting", ["default", "compiled_decoding"])
def test_torch_compile_traces_linear_in_one_graph_whatever_the_settings(setting, calls):
    """The compiled-decoding setting is a context variable, which dynamo cannot read: under torch.compile
    an AccelLinear is F.linear before it looks at it (no graph break; fullgraph would fail)."""
    from contextlib import nullcontext

    torch._dynamo.reset()
    layer = Linear(16, 8)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # dynamo only: no inductor compile
    context = {"default": nullcontext(), "compiled_decoding": tl.compiled_decoding()}
    x = torch.randn(1, 16)
    with torch.no_grad(), context[setting]:
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []  # traced as F.linear


def test_compiled_bf16_gemv_is_as_accurate_as_bf16_f_linear():
    """A one-row bfloat16 product, compiled (reading each bfloat16 weight once, summing in float32), is
    as close to float64's result as PyTorch's own bfloat16 F.linear (within 1.5x its error, and within
    bfloat16's resolution)."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(64, 96, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    x = torch.randn(1, 1, 96, generator=g).bfloat16()
    exact = F.linear(x.double(), w.double(), b.double())
    saved = tl.ONEDNN_MIN_MNK
    tl.ONEDNN_MIN_MNK = 0
    try:
        with torch.no_grad(), tl.compiled_decoding():
            got = linear(x, w, b)
    finally:
        tl.ONEDNN_MIN_MNK = saved
    assert got.dtype == torch.bfloat16 and _built(("_gemv_bf16_eager", 64, 96, True))
    stock = F.linear(x, w, b)
    err, ref_err = (float((t.double() - exact).abs().max()) for t in (got, stock))
    assert err <= 1.5 * ref_err + 1e-12 and err <= 2**-7 * float(exact.abs().max())


# --- bfloat16 autocast products with bucketed rows --------------------------------------------------------
def _autocast_grads(fn, x, w, b, grad):
    xs = x.detach().clone().requires_grad_(x.requires_grad)
    ws, bs = w.detach().clone().requires_grad_(), None if b is None else b.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(xs, ws, bs)
    inputs = [t for t in (xs, ws, bs) if t is not None and t.requires_grad]
    return (y, *torch.autograd.grad(y, inputs, grad))


@pytest.mark.parametrize(
    ("shape", "bias", "dtype"),
    [
        ((3, 37, 48), True, torch.float32),
        ((130, 48), False, torch.float32),
        ((2, 50, 48), True, torch.bfloat16),
    ],
)
def test_bucketed_bf16_product_is_autocasts_function(shape, bias, dtype):
    """Padded rows change nothing but the weight gradient's summation order: outputs, dtypes and every
    gradient are autocast F.linear's (bfloat16 rounding: a few bf16 ulps of the largest entry)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    w, b = torch.randn(40, 48, generator=g), torch.randn(40, generator=g) if bias else None
    grad = torch.randn(*shape[:-1], 40, generator=g).bfloat16()
    assert tb.bucket_eligible(x, w, b) is False  # outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tb.bucket_eligible(x, w, b)
        assert not tb.bucket_eligible(x[..., :1, :], w, b)  # fewer than ROW_BUCKET rows
    want = _autocast_grads(F.linear, x, w, b, grad)
    got = _autocast_grads(tb.bucketed_linear, x, w, b, grad)
    for a, e in zip(got, want, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = e.float().abs().max().item()
        torch.testing.assert_close(a.float(), e.float(), rtol=0, atol=4 * 2**-8 * scale)


class _BucketTuner:
    """Picks a scripted winner for the bfloat16 class; runs each candidate once (they leave no trace)."""

    def __init__(self, winner: str) -> None:
        self.winner, self.asked = winner, []

    def choose(self, key, candidates, *, stock):
        if key[0] == "attention":  # float32 attention classes (decision 112): not scripted here
            return stock
        assert stock == "stock" and set(candidates) == {"stock", "bucket"}
        for run in candidates.values():
            run()
        self.asked.append(key)
        return self.winner


@pytest.mark.parametrize("winner", ["stock", "bucket"])
def test_bf16_products_take_the_measured_path_once_per_class(winner, monkeypatch):
    fake = _BucketTuner(winner)
    monkeypatch.setattr(accel, "_tuner", fake)
    padded = []
    real = tb._RowBucketLinear.apply
    monkeypatch.setattr(tb._RowBucketLinear, "apply", lambda *a: padded.append(a[-1]) or real(*a))
    torch.manual_seed(0)
    model = accel.apply(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)))
    x = torch.randn(2, 45, 16)
    for rows in (45, 50):  # 90 and 100 rows: both pad to 128
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x[:, :rows]).float().sum().backward()
    assert fake.asked == [("linear", "bfloat16", "train", "rows")]
    assert accel.recorded(model) == {"linear/bfloat16/train/rows": winner}
    # the timing's own "bucket" call (91 rows), then the layers' four products where "bucket" won
    assert padded == [128] * (5 if winner == "bucket" else 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert fake.asked[1:] == [("linear", "bfloat16", "infer", "rows")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x[:, :10]).float().sum().backward()  # 20 rows: stock, not asked
    assert len(fake.asked) == 2
