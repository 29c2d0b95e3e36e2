"""The whole batch-1 decoding step as one compiled graph (accel/decode_graph.py, decision 111): the same
logits and cache as the eager step, one compile per model whatever the prompt, capacity or position,
taken by default only where this machine measured it faster and the generation pays for compiling it,
and a graph that fails to compile falls back to the per-product kernels."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from tformer import accel
from tformer.accel import decode_graph
from tformer.accel.compiled import compiled_decoding
from tformer.config import LMConfig
from tformer.inference.sampling import generate
from tformer.models.lm import LanguageModel

pytestmark = pytest.mark.decode_graph

VOCAB = 61


def _lm(dtype: torch.dtype = torch.float32, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    config = LMConfig(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=24)
    return LanguageModel(config).eval().to(dtype)


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    """One model for the tests that compile (each model compiles once per process), its products the
    reduction (what the default's compiled kernels compute; this tiny model's own verdicts would pick
    F.linear: it is below the kernels' size floor)."""
    model = accel.apply(_lm())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_graph, "_reduces", lambda layer, plan, compiled: True)
        generate(model, _prompt(4), max_new_tokens=6, greedy=True, compile=True)  # compiles it
    return model


def _prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _steps_both_ways(model: LanguageModel, graph: decode_graph.DecodeGraph, steps: int):
    """Feed the same tokens to the eager step (kernels off) and to the graph, each on its own cache:
    -> [(eager logits, graph logits)], and the two caches."""
    with torch.no_grad():
        eager_cache = model.new_cache(steps + 6)
        model(_prompt(3), cache=eager_cache)
        graph_cache = eager_cache.clone()
        tokens = _prompt(steps, seed=2)
        pairs = []
        for i in range(steps):
            token = tokens[:, i : i + 1].clone()
            with compiled_decoding(False):
                eager = model(token, cache=eager_cache, last_only=True, checked=True).logits
            pairs.append((eager, graph(model, token, graph_cache)))
    return pairs, eager_cache, graph_cache


def test_the_graph_computes_the_eager_step_and_writes_the_same_cache(lm):
    graph = decode_graph.graph_for(lm)
    assert graph is not None
    pairs, eager_cache, graph_cache = _steps_both_ways(lm, graph, steps=5)
    assert all(m.__dict__[decode_graph.GRAPH_ATTR] for m in lm.modules() if type(m) is accel.AccelLinear)
    for eager, compiled in pairs:
        assert compiled.shape == eager.shape == (1, 1, VOCAB)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # float32 sums in another order
    assert graph_cache.length == eager_cache.length == 8
    for a, b in zip(eager_cache.kv, graph_cache.kv, strict=True):
        torch.testing.assert_close(b.k, a.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.v, a.v, rtol=1e-5, atol=1e-5)


def test_generate_with_the_graph_gives_the_eager_tokens_and_compiles_once(lm):
    """Prompts of 1, 4 and 9 tokens and a text that outgrows max_seq_len (the cache is cleared and
    refilled): compile=False's tokens, and no graph compiled after the model's first."""
    graph = decode_graph.graph_for(lm)
    assert graph is not None
    generate(lm, _prompt(4), max_new_tokens=6, greedy=True, compile=True)  # compiled (if not yet)
    assert graph.compiled
    before = counters["stats"]["unique_graphs"]
    for n, new in ((1, 8), (4, 12), (9, 5), (2, 40)):
        expected = generate(lm, _prompt(n), max_new_tokens=new, greedy=True, compile=False)
        assert torch.equal(generate(lm, _prompt(n), max_new_tokens=new, greedy=True, compile=True), expected)
    assert counters["stats"]["unique_graphs"] == before


def test_compile_true_measures_the_graph_once_and_the_default_follows_the_record(lm):
    generate(lm, _prompt(4), max_new_tokens=6, greedy=True, compile=True)
    key = accel._graph_key(lm)
    record = accel.tuner().record(key)
    assert record is not None and record["ratio"] > 0 and record["compile_s"] >= 0
    assert set(record["median_s"]) == {"base", "fast"}
    generate(lm, _prompt(4), max_new_tokens=6, greedy=True, compile=True)
    assert accel.tuner().record(key) == record  # measured once per machine
    taken = accel.decoding_graph(lm, None, batch=1, steps=5)  # compiled in this process already
    assert taken is (decode_graph.graph_for(lm) if record["ratio"] >= decode_graph.MIN_SPEEDUP else None)


def test_a_bfloat16_model_decodes_as_its_eager_step_to_bfloat16_precision():
    """Its own verdicts (below the compiled kernels' size floor: stock) give it F.linear's products."""
    model = accel.apply(_lm(torch.bfloat16, seed=3))
    graph = decode_graph.graph_for(model)
    assert graph is not None
    pairs, _, _ = _steps_both_ways(model, graph, steps=3)
    marks = {m.__dict__[decode_graph.GRAPH_ATTR] for m in model.modules() if type(m) is accel.AccelLinear}
    assert marks == {False}
    for eager, compiled in pairs:  # bfloat16 products: float32 sums rounded once per product, both ways
        assert compiled.dtype == torch.bfloat16
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


class _Records:
    """A tuner whose cached record of the graph's measurement the test sets."""

    def __init__(self, record):
        self.value = record

    def record(self, key):
        assert key[0] == "decode-graph"
        return self.value


def _record(ratio: float, base: float = 0.02, compile_s: float = 10.0):
    return {"ratio": ratio, "median_s": {"base": base, "fast": base / ratio}, "compile_s": compile_s,
            "tformer": accel.__version__}  # fmt: skip


def test_the_default_takes_the_graph_only_where_it_measured_faster_and_is_paid_for(monkeypatch):
    model = accel.apply(_lm(seed=4))  # nothing here compiles: decoding_graph only chooses
    plan = accel._plan_of(model)
    tuner = _Records(None)
    monkeypatch.setattr(plan, "tuner", tuner)
    assert accel.decoding_graph(model, None, 1, 10**6) is None  # never measured
    tuner.value = _record(1.02)
    assert accel.decoding_graph(model, None, 1, 10**6) is None  # within MIN_SPEEDUP
    tuner.value = _record(2.0)  # 10 ms saved per step against 10 s of compiling
    assert accel.decoding_graph(model, None, 1, 900) is None
    graph = accel.decoding_graph(model, None, 1, 1100)
    assert graph is not None and graph is decode_graph.graph_for(model)
    graph.compiled = True  # compiled in this process: any generation takes it
    assert accel.decoding_graph(model, None, 1, 3) is graph
    tuner.value = {**_record(2.0), "tformer": "0.0.1"}  # another version's measurement
    assert accel.decoding_graph(model, None, 1, 3) is None
    tuner.value = _record(2.0)
    assert accel.decoding_graph(model, False, 1, 10**6) is None
    assert accel.decoding_graph(model, None, 8, 10**6) is None  # batch 1 only
    assert accel.decoding_graph(model, True, 1, 1) is graph
    monkeypatch.setenv("TFORMER_ACCEL", "off")
    assert accel.decoding_graph(model, True, 1, 1) is None


def test_only_plain_float_cpu_models_with_accel_get_a_graph():
    assert decode_graph.graph_for(_lm(seed=5)) is None  # no tformer.accel layers
    model = accel.apply(_lm(seed=5))
    assert decode_graph.graph_for(model) is not None
    with accel.reverted(model):
        assert decode_graph.graph_for(model) is None
    assert decode_graph.graph_for(model) is not None
    keys = set(_lm(seed=5).state_dict())
    assert set(model.state_dict()) == keys  # the graph's mark on the layers is no state


def test_a_graph_that_does_not_compile_warns_once_and_the_kernels_decode(monkeypatch):
    model = accel.apply(_lm(seed=6))
    graph = decode_graph.graph_for(model)
    assert graph is not None

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(graph, "_fn", broken)
    expected = generate(model, _prompt(3), max_new_tokens=6, greedy=True, compile=False)
    with pytest.warns(RuntimeWarning, match="did not compile as one graph .RuntimeError: no C.. compiler.;"):
        assert torch.equal(generate(model, _prompt(3), max_new_tokens=6, greedy=True, compile=True), expected)
    assert decode_graph.graph_for(model) is None  # this model decodes with its kernels from now on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(generate(model, _prompt(3), max_new_tokens=6, greedy=True, compile=True), expected)


@pytest.mark.parametrize(
    ("kernel", "reduces"), [("compiled", True), ("eager", True), ("stock", False), ("addmv", False)]
)
@pytest.mark.parametrize("step", [None, False])
def test_the_graph_computes_each_product_as_the_default_would(kernel, reduces, step, monkeypatch):
    """The default's kernel for a layer (Plan.one_row: the machine's verdicts, with compiled kernels
    unless the whole step measured slower with them) -> the graph's: the reduction for the compiled
    kernel and for oneDNN (which a graph cannot call), F.linear otherwise."""
    monkeypatch.setattr(accel, "decoding_setting", lambda model, compile: step)
    model = accel.apply(_lm(seed=7))
    plan = accel._plan_of(model)
    asked = []

    def one_row(x, weight, bias, *, compiled):
        asked.append((tuple(x.shape), tuple(weight.shape), compiled))
        return kernel

    monkeypatch.setattr(plan, "one_row", one_row)
    decode_graph.mark(model)
    layers = [m for m in model.modules() if type(m) is accel.AccelLinear]
    assert {m.__dict__[decode_graph.GRAPH_ATTR] for m in layers} == {reduces}
    assert asked == [((1, 1, m.weight.shape[1]), tuple(m.weight.shape), step is None) for m in layers]
