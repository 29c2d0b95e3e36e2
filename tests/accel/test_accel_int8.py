"""accel/int8.py's dequantised product of torchao int8 weights ("dequant"): torchao's function bit for bit,
taken where the plan chose it, decided once per machine, safe from threads."""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tformer.accel.int8 as ti
import tformer.accel.plan as tp
from tformer import accel
from tformer.config import LMConfig
from tformer.inference.precision import apply_precision
from tformer.inference.sampling import generate
from tformer.models.lm import LanguageModel

ao = pytest.importorskip("torchao.quantization")
logging.getLogger("torchao").setLevel(logging.ERROR)


def _quantised(config_name: str, n: int, k: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    """A float32 nn.Linear and its torchao-quantised copy."""
    torch.manual_seed(0)
    ref = nn.Linear(k, n, bias=bias).eval()
    q = copy.deepcopy(ref)
    ao.quantize_(q, getattr(ao, config_name)())
    return ref, q


def _torchao_rows(x2: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's own per-row symmetric quantisation (what its int8 linear does to activations)."""
    import torchao.quantization.quant_primitives as qp

    block = [1, x2.shape[1]]
    scale, zero = qp.choose_qparams_affine(
        x2, qp.MappingType.SYMMETRIC, block, torch.int8, qmin, qmax, eps=torch.finfo(torch.float32).eps,
        scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True,
    )  # fmt: skip
    return qp.quantize_affine(x2, block, scale, zero, torch.int8, qmin, qmax).float(), scale


rows = st.lists(
    st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False, width=32),
            st.sampled_from([0.0, -0.0, 1e-45, -1e-38, 3.4e38, 1e-3]),
        ),
        min_size=5,
        max_size=5,
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(rows=rows, bounds=st.sampled_from([(-128, 127), (-64, 63)]))
def test_the_eager_row_quantisation_is_torchaos_bit_for_bit(rows, bounds):
    """Values and scales equal torchao's choose_qparams_affine + quantize_affine for any finite rows: zero
    rows (the scale's eps floor), one sign only, subnormals, the float32 extremes, and both ranges."""
    x2 = torch.tensor(rows, dtype=torch.float32)
    want_q, want_scale = _torchao_rows(x2, *bounds)
    got_q, got_scale = ti.quantize_rows_eager(x2, *bounds)
    assert torch.equal(got_scale, want_scale)
    assert torch.equal(got_q, want_q)


@pytest.mark.parametrize("shape", [(96,), (1, 1, 96), (3, 7, 96), (20, 96)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [ti.DEQUANT_CHUNK, 96 * 7])
def test_the_dequantised_product_is_torchaos_function_bit_for_bit(shape, bias, chunk, monkeypatch):
    """Dynamic int8 activations: exactly torchao's int8 linear (integer dot products exact in float32 at K
    = 96, the rescale in torchao's order), whole or in chunks of 7 output rows; and not float32's."""
    monkeypatch.setattr(ti, "DEQUANT_CHUNK", chunk)
    ref, q = _quantised("Int8DynamicActivationInt8WeightConfig", 40, 96, bias)
    x = 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert ti.dequant_eligible(x, q.weight, q.bias)
        want = F.linear(x, q.weight, q.bias)  # torchao's kernel
        got = ti.int8_dequant_linear(x, q.weight, q.bias)
        assert got.shape == want.shape == (*shape[:-1], 40)
        assert torch.equal(got, want)
        assert (want - ref(x)).abs().max() > 1e-3  # int8 rounding is visible: the test sees which function


def test_weight_only_int8_is_torchaos_function_up_to_summation_order():
    ref, q = _quantised("Int8WeightOnlyConfig", 40, 96, True)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert ti.dequant_eligible(x, q.weight, q.bias)
        torch.testing.assert_close(
            ti.int8_dequant_linear(x, q.weight, q.bias), F.linear(x, q.weight, q.bias), rtol=1e-6, atol=1e-6
        )


def test_what_it_does_not_compute_is_left_to_torchao():
    """Plain weights, autograd, autocast, other dtypes, a width mismatch (torchao's error) and empty inputs
    are not its to take."""
    _, q = _quantised("Int8DynamicActivationInt8WeightConfig", 40, 96, True)
    x = torch.randn(2, 96)
    plain = nn.Linear(96, 40)
    assert not ti.dequant_eligible(x, plain.weight, plain.bias)
    assert not ti.dequant_eligible(x.clone().requires_grad_(), q.weight, q.bias)
    assert not ti.dequant_eligible(x.double(), q.weight, None)
    assert not ti.dequant_eligible(torch.randn(2, 95), q.weight, q.bias)
    assert not ti.dequant_eligible(torch.randn(0, 96), q.weight, q.bias)
    assert not ti.dequant_eligible(x, q.weight, q.bias.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ti.dequant_eligible(x, q.weight, q.bias)


def test_threads_each_use_their_own_buffer():
    """Concurrent products of different widths (one buffer per width per thread) give each its own
    torchao result."""
    layers = [_quantised("Int8DynamicActivationInt8WeightConfig", 48, k, True)[1] for k in (64, 96, 64, 96)]
    inputs = [torch.randn(9, layer.in_features, generator=torch.Generator().manual_seed(i)) for i, layer in
              enumerate(layers)]  # fmt: skip
    with torch.no_grad():
        want = [F.linear(x, layer.weight, layer.bias) for x, layer in zip(inputs, layers, strict=True)]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(20):
                    results[i].append(ti.int8_dequant_linear(inputs[i], layers[i].weight, layers[i].bias))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert all(torch.equal(y, want[i]) for y in results[i])


class _Int8Tuner:
    """Scripted: the int8 class gets `winner` (after both candidates ran once); decode verdicts are
    "compiled" against whatever eager path is named stock; all else stock."""

    def __init__(self, winner: str) -> None:
        self.winner = winner
        self.asked: list[tuple[tuple[object, ...], str]] = []

    def choose(self, key, candidates, *, stock):
        if key[0] == "attention":  # float32 attention classes (decision 112): not scripted here
            return stock
        self.asked.append((key, stock))
        if key == tuple(tp.INT8_CLASS.split("/")):
            assert stock == "stock" and set(candidates) == {"stock", "dequant"}
            outs = [run() for run in candidates.values()]
            assert torch.equal(outs[0], outs[1])  # both compute torchao's function on the timed slice
            return self.winner
        return stock

    def lookup(self, key, *, stock=None):
        return None


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        LMConfig(vocab_size=61, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=32)
    ).eval()


@pytest.mark.parametrize("winner", ["dequant", "stock"])
def test_an_int8_model_takes_the_path_its_machine_chose(winner, monkeypatch):
    """With the int8 class measured once: "dequant" serves the prompt's pass and the decoding steps of a
    batch (several rows), not one row's, and the tokens are torchao's (no accel) bit for bit; "stock"
    leaves every product to torchao."""
    served: list[tuple[int, ...]] = []
    real = ti.int8_dequant_linear

    def counting(x, w, b):
        served.append(tuple(x.shape))
        return real(x, w, b)

    monkeypatch.setattr(tp._int8, "int8_dequant_linear", counting)
    monkeypatch.setattr(accel.linear, "int8_dequant_linear", counting)
    tuner = _Int8Tuner(winner)
    monkeypatch.setattr(accel, "_tuner", tuner)
    base = apply_precision(_lm(), "int8")
    q = accel.apply(copy.deepcopy(base))
    prompt = torch.randint(61, (2, 5), generator=torch.Generator().manual_seed(3))
    want = generate(base, prompt, max_new_tokens=6, greedy=True)
    with torch.no_grad():
        q(prompt)  # the first product of several rows decides the machine's class (timing both paths)
    served.clear()
    got = generate(q, prompt, max_new_tokens=6, greedy=True, compile=False)
    assert torch.equal(got, want)
    int8_asks = [k for k, _ in tuner.asked if k == tuple(tp.INT8_CLASS.split("/"))]
    assert len(int8_asks) == 1  # once per machine class, not per shape
    assert accel.recorded(q)[tp.INT8_CLASS] == winner
    if winner == "dequant":
        assert any(s[:2] == (2, 5) for s in served)  # the prompt's pass
        assert any(s[:2] == (2, 1) for s in served)  # decoding steps
        one = torch.randint(61, (1, 4), generator=torch.Generator().manual_seed(4))
        served.clear()
        with torch.no_grad():
            q(one[:, :1])  # one row: the decoding paths, not this one
        assert served == []
        assert torch.equal(
            generate(q, one, max_new_tokens=4, greedy=True),
            generate(base, one, max_new_tokens=4, greedy=True),
        )
    else:
        assert served == []
