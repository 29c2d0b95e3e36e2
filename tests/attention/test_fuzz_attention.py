"""Property-based tests of the attention backends over random shapes, masks and options.

Tiny problems (B <= 2, H <= 3, T, S <= 6, D <= 4) in float64, where the exact backends must agree with
`math` to 1e-10; float32 cases are held to 2e-5. Masks are random booleans of every shape that broadcasts
to (B, H, T, S), so query rows with no key to attend to are common: they must give zeros, never NaN."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tformer.attention import MultiHeadAttention, causal_mask, combine, get_backend, math_attention
from tformer.attention.local import band_mask

pytestmark = pytest.mark.fuzz

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}  # atol and rtol


@dataclass
class Problem:
    q: torch.Tensor  # (B, H, T, D)
    k: torch.Tensor  # (B, H or 1, S, D)
    v: torch.Tensor  # (B, H or 1, S, D_v)
    mask: torch.Tensor | None  # bool, broadcastable to (B, H, T, S)
    causal: bool

    @property
    def allowed(self) -> torch.Tensor:
        """The (B, H, T, S) mask every backend must apply: the mask and, when causal, the causal mask."""
        b, h, t, _ = self.q.shape
        s = self.k.shape[-2]
        full = combine(self.mask, causal_mask(t, s) if self.causal else None)
        return torch.ones(b, h, t, s, dtype=torch.bool) if full is None else full.expand(b, h, t, s)


@st.composite
def problems(
    draw: st.DrawFn,
    *,
    dtypes: tuple[torch.dtype, ...] = (torch.float64,),
    key_padding: bool = False,
    self_attention: bool = False,
    shared_kv: bool = False,
) -> Problem:
    """q, k, v from a seeded generator; the mask drawn bit by bit (so it shrinks well). `key_padding`:
    masks that depend on the key alone (H, T dims of 1), as `local` takes; `shared_kv`: k and v may have
    one head for all query heads (broadcast)."""
    b, h, t, d = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 4)),
    )
    s = t if self_attention else draw(st.integers(1, 6))
    d_v = draw(st.sampled_from([d, d + 1]))  # the "l2" score widens q and k only
    dtype = draw(st.sampled_from(dtypes))
    magnitude = draw(st.sampled_from([1.0, 1.0, 10.0])) if dtype == torch.float64 else 1.0
    h_kv = draw(st.sampled_from([h, 1])) if shared_kv else h
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def randn(*shape: int) -> torch.Tensor:
        return (magnitude * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    q, k, v = randn(b, h, t, d), randn(b, h_kv, s, d), randn(b, h_kv, s, d_v)
    mask = None
    if draw(st.integers(0, 4)):  # a mask four times in five
        full = [b, 1 if key_padding else h, 1 if key_padding else t, s]
        shape = [n if draw(st.booleans()) else 1 for n in full]
        while shape and shape[0] == 1 and draw(st.booleans()):  # fewer leading dims, as (T, S) or (S,)
            shape = shape[1:]
        n = 1
        for size in shape:
            n *= size
        bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        mask = torch.tensor(bits, dtype=torch.bool).reshape(shape)
    return Problem(q, k, v, mask, draw(st.booleans()))


def _tiny(mask: torch.Tensor, *, t: int = 2, s: int = 3) -> Problem:
    """A pinned example: masks of fewer than two dims ((S,) or ()) once crashed `sdpa` and `chunked`."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 2, generator=g, dtype=torch.float64) for n in (t, s, s))
    return Problem(q, k, v, mask, causal=False)


ONE_DIM = _tiny(torch.tensor([True, False, True]))
ZERO_DIM = _tiny(torch.tensor(True))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    tol = TOL[want.dtype] * max(1.0, want.abs().max().item() if want.numel() else 1.0)
    torch.testing.assert_close(got, want, atol=tol, rtol=TOL[want.dtype])


def _run(
    name: str, p: Problem, mask: torch.Tensor | None = None, causal: bool | None = None, **options: Any
) -> torch.Tensor:
    out, _ = get_backend(name).fn(
        p.q,
        p.k,
        p.v,
        p.mask if mask is None else mask,
        causal=p.causal if causal is None else causal,
        **options,
    )
    return out


@given(p=problems(dtypes=(torch.float64, torch.float32), shared_kv=True))
def test_math_is_finite_and_empty_rows_are_zero(p):
    out, weights = math_attention(p.q, p.k, p.v, p.mask, causal=p.causal, need_weights=True)
    assert weights is not None and torch.isfinite(out).all() and torch.isfinite(weights).all()
    allowed = p.allowed
    empty = ~allowed.any(-1)  # (B, H, T)
    assert (out[empty] == 0).all()
    assert (weights[~allowed] == 0).all()  # a masked key gets exactly no weight
    sums = weights.sum(-1)
    _close(sums[~empty], torch.ones_like(sums[~empty]))
    assert (sums[empty] == 0).all()


@pytest.mark.parametrize("name", ["sdpa", "chunked"])
@given(p=problems(dtypes=(torch.float64, torch.float32)), block=st.integers(1, 7))
@example(p=ONE_DIM, block=2)
@example(p=ZERO_DIM, block=2)
def test_exact_backends_equal_math(name, p, block):
    options = {"block_size": block} if name == "chunked" else {}
    out = _run(name, p, **options)
    assert torch.isfinite(out).all()
    assert (out[~p.allowed.any(-1)] == 0).all()  # empty rows: exactly zero
    _close(out, _run("math", p))


@pytest.mark.parametrize("name", ["math", "sdpa", "chunked"])
@given(p=problems())
def test_causal_flag_equals_an_explicit_causal_mask(name, p):
    t, s = p.q.shape[-2], p.k.shape[-2]
    explicit = combine(p.mask, causal_mask(t, s))
    _close(_run(name, p, causal=True), _run(name, p, mask=explicit, causal=False))


# T == S takes the blocked path; T != S (decoding with a cache) goes through math with the band directly
@given(
    p=st.one_of(problems(key_padding=True, self_attention=True), problems(key_padding=True)),
    window=st.integers(1, 7),
)
def test_local_equals_math_under_its_band_mask(p, window):
    t, s = p.q.shape[-2], p.k.shape[-2]
    out = _run("local", p, window=window)
    assert torch.isfinite(out).all()
    band = combine(p.mask, band_mask(t, s, window, causal=p.causal))
    _close(out, _run("math", p, mask=band, causal=False))


@pytest.mark.parametrize("name", ["sdpa", "chunked"])
@given(p=problems())
@example(p=ONE_DIM)
@example(p=ZERO_DIM)
def test_gradients_equal_math_and_are_finite(name, p):
    """chunked has its own backward (recomputed from the log-sum-exp); sdpa's masks out empty rows."""

    def grads(backend: str) -> list[torch.Tensor]:
        q, k, v = (x.detach().requires_grad_() for x in (p.q, p.k, p.v))
        out, _ = get_backend(backend).fn(q, k, v, p.mask, causal=p.causal)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        return list(torch.autograd.grad((out * weight).sum(), (q, k, v)))

    for got, want in zip(grads(name), grads("math"), strict=True):
        assert torch.isfinite(got).all()
        _close(got, want)


@given(p=problems(shared_kv=True))
def test_chunked_gradients_with_keys_shared_across_heads(p):
    """k and v broadcast over heads (shape 1 there): chunked sums their gradient back down."""
    q, k, v = (x.detach().requires_grad_() for x in (p.q, p.k, p.v))
    out = get_backend("chunked").fn(q, k, v, p.mask, causal=p.causal, block_size=2)[0]
    ref = math_attention(q, k, v, p.mask, causal=p.causal)[0]
    _close(out, ref)
    for got, want in zip(
        torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v)), strict=True
    ):
        assert got.shape == want.shape
        _close(got, want)


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "local"])
@given(
    h=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2]),
    d_head=st.integers(1, 3),
    t=st.integers(1, 5),
    window=st.integers(1, 5),
    causal=st.booleans(),
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=2),
    seed=st.integers(0, 2**16),
)
# local's weights once came from math without the window
@example(h=1, group=1, d_head=1, t=3, window=1, causal=False, lengths=[1], seed=0)
def test_multihead_equals_math_and_weights_do_not_change_the_output(
    backend, h, group, d_head, t, window, causal, lengths, seed
):
    """The whole module (projections, grouped-query heads, padding) in float64. Asking for weights from a
    backend that cannot return them falls back to `math`, which must compute the same attention."""
    torch.manual_seed(seed)
    n_kv = h // group if h % group == 0 else h
    kwargs = {"n_kv_heads": n_kv, "backend_options": {"window": window}}
    mha = MultiHeadAttention(h * d_head, h, backend=backend, **kwargs).double().eval()
    ref = MultiHeadAttention(h * d_head, h, backend="math", n_kv_heads=n_kv).double().eval()
    ref.load_state_dict(mha.state_dict())
    x = torch.randn(len(lengths), t, h * d_head, dtype=torch.float64)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]  # (B, 1, 1, S)
    out = mha(x, mask=mask, causal=causal).out
    ref_mask = combine(mask, band_mask(t, t, window, causal=causal)) if backend == "local" else mask
    _close(out, ref(x, mask=ref_mask, causal=causal).out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "cannot return weights; using 'math'"
        with_weights = mha(x, mask=mask, causal=causal, need_weights=True)
    assert with_weights.weights is not None
    _close(with_weights.out, out)
