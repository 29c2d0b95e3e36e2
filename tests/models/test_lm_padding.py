"""A batch of prompts of different lengths, right-padded, gives each row exactly what it gets alone: with and
without the KV cache, for learned, sinusoidal and rotary positions (and grouped-query attention), while rows
join (`LMCache.cat`) and leave (`index_select`) a running cache.

Tolerances: in float64 the batched and the one-row results agree to 1e-12 (the same arithmetic up to
summation order: the masks and positions are exact); float32 differs only by that rounding, ~1e-7 per
product over two layers, so 1e-5 on logits of magnitude ~1 is ~100 ulps, far below any wrong mask or
position (those change logits by ~1e-1).
"""

import pytest
import torch

from tformer.config import LMConfig
from tformer.models import LanguageModel
from tformer.models.lm import LMCache

LENGTHS = [3, 7, 1, 5]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _model(positions, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    c = LMConfig(
        vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0, max_seq_len=24,
        positions=positions, **kw,
    )  # fmt: skip
    return LanguageModel(c).to(dtype).eval()


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 40, (n,), generator=g) for n in LENGTHS]


def _padded(prompts, pad=0):
    out = torch.full((len(prompts), max(len(p) for p in prompts)), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


CASES = [
    ("learned", torch.float32, {}),
    ("sinusoidal", torch.float32, {}),
    ("rotary", torch.float32, {}),
    ("rotary", torch.float32, {"n_kv_heads": 2}),
    ("learned", torch.float64, {}),
    ("rotary", torch.float64, {}),
]


@pytest.mark.parametrize(("positions", "dtype", "kw"), CASES)
@torch.no_grad()
def test_padded_forward_equals_each_row_alone(positions, dtype, kw):
    model, prompts = _model(positions, dtype, **kw), _prompts()
    batch = model(_padded(prompts)).logits  # no mask needed: padding follows every real token
    last = model(_padded(prompts), last_only=True, lengths=LENGTHS).logits
    for i, p in enumerate(prompts):
        alone = model(p[None]).logits[0]
        _close(batch[i, : len(p)], alone, dtype)
        _close(last[i, 0], alone[-1], dtype)


@pytest.mark.parametrize(("positions", "dtype", "kw"), CASES)
@torch.no_grad()
def test_cached_rows_at_their_own_positions_equal_each_row_alone(positions, dtype, kw):
    """Prefill right-padded prompts with `lengths`, then decode 4 steps with every row at its own position:
    each step's logits equal that row's own cached decoding of the same tokens."""
    model, prompts = _model(positions, dtype, **kw), _prompts(1)
    cache = model.new_cache()
    out = model(_padded(prompts), cache=cache, last_only=True, lengths=LENGTHS)
    assert cache.lengths == LENGTHS and cache.length == max(LENGTHS)
    alone = [model.new_cache() for _ in prompts]
    expected = [
        model(p[None], cache=c, last_only=True).logits[0, -1] for p, c in zip(prompts, alone, strict=True)
    ]
    for step in range(4):
        for i in range(len(prompts)):
            _close(out.logits[i, -1], expected[i], dtype)
        tokens = out.logits[:, -1].argmax(-1)  # (B,) each row's greedy token
        out = model(tokens[:, None], cache=cache, last_only=True)
        expected = [
            model(tokens[i].view(1, 1), cache=c, last_only=True).logits[0, -1] for i, c in enumerate(alone)
        ]
        assert cache.lengths == [n + step + 1 for n in LENGTHS]
    for i in range(len(prompts)):
        _close(out.logits[i, -1], expected[i], dtype)


@torch.no_grad()
def test_rows_join_and_leave_a_running_cache():
    """A request prefilled alone joins a running batch (cat), another leaves (index_select): every row's
    logits still equal its own decoding, and rows of equal length go back to the uniform cache."""
    model = _model("rotary")
    a, b, c = _prompts(2)[:3]
    running = model.new_cache()
    out_ab = model(_padded([a, b]), cache=running, last_only=True, lengths=[len(a), len(b)])
    own = {k: model.new_cache() for k in "abc"}
    ref = {
        k: model(p[None], cache=own[k], last_only=True).logits[0, -1]
        for k, p in zip("abc", (a, b, c), strict=True)
    }
    _close(out_ab.logits[0, -1], ref["a"], torch.float32)
    _close(out_ab.logits[1, -1], ref["b"], torch.float32)
    joining = model.new_cache()
    out_c = model(c[None], cache=joining, last_only=True)
    _close(out_c.logits[0, -1], ref["c"], torch.float32)
    running = LMCache.cat([running, joining])  # rows a, b, c
    assert running.lengths == [len(a), len(b), len(c)]
    rows = "abc"
    for step in range(3):
        token = torch.tensor([[4 + step]] * len(rows))
        out = model(token, cache=running, last_only=True)
        for i, k in enumerate(rows):
            ref[k] = model(token[:1], cache=own[k], last_only=True).logits[0, -1]
            _close(out.logits[i, -1], ref[k], torch.float32)
        if step == 0:  # b finishes: its row leaves
            running = running.index_select(torch.tensor([0, 2]))
            rows = "ac"
    assert running.lengths == [len(a) + 3, len(c) + 3]


def test_rows_of_one_length_are_the_uniform_cache():
    model = _model("learned")
    cache = model.new_cache()
    with torch.no_grad():
        model(_padded(_prompts()[:2]), cache=cache, lengths=[2, 2])
    assert cache.lengths == [2, 2] and cache.length == 2
    assert all(kv.lengths is None for kv in cache.kv)  # slice writes and the causal kernel, as today


def test_lengths_are_checked():
    model = _model("learned")
    ids = torch.randint(4, 40, (2, 5))
    with pytest.raises(ValueError, match=r"lengths must be 2 ints in \[1, T=5\]"):
        model(ids, lengths=[5, 6])
    with pytest.raises(ValueError, match=r"lengths must be 2 ints in \[1, T=5\]"):
        model(ids, lengths=[3])
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, cache=cache)
    with pytest.raises(ValueError, match="lengths .* do not fit a cache of 2 rows"):
        cache.set_lengths([1, 2, 3])
