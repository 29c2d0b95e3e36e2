"""What each attention backend can do, declared once. Imports no torch, so `config.py` validates against
it; `attention/backends.py` imports each kernel (and `MultiHeadAttention` each parameter factory) from the
"module:function" paths named here, on first use.

Adding a backend is one file with its kernel (the contract of attention/backends.py) plus one `Backend`
entry in `BACKENDS` below. Everything that asks what a backend can do (config validation, the attention
module, the layers' builders) reads the entry: causal or not, cross-attention or not, attention dropout,
weights, score functions, mask kinds, the user-facing options it takes, the parameters it owns.
"""

from __future__ import annotations

from dataclasses import dataclass

SCORES = ("dot", "cosine", "l2")  # attention/scores.py
EXACT = SCORES  # an exact kernel computes softmax(q k^T * scale) v for any q and k: every score function
MASKS = ("any", "key_padding")  # any bool mask broadcastable to (B, H, T, S), or (B, 1, 1, S) ones only


@dataclass(frozen=True)
class Backend:
    """One backend's capabilities. `options` are user-facing names (MultiHeadAttention's
    `backend_options` keys): given to `params` when the backend owns parameters (they size them), else to
    the kernel. `params` is a "module:function" `(n_heads, d_head, **options) -> {name: nn.Parameter}`; the
    kernel receives the parameters by those names, and the names are the state-dict keys.
    `reference_mask` ("module:function" `(t, s, *, causal, device, **options) -> (T, S) bool mask`) is what
    the `math` reference must also mask to compute this backend's attention, when weights are asked of a
    backend without them."""

    name: str
    kernel: str  # "module:function" with the backend signature
    causal: bool = True
    cross: bool = True  # attends from a target to a source (cross-attention)
    dropout: bool = True  # attention dropout
    weights: bool = False  # returns the (B, H, T, S) attention weights
    scores: tuple[str, ...] = ("dot",)
    masks: str = "any"
    options: tuple[str, ...] = ()
    params: str | None = None
    reference_mask: str | None = None
    why: str = ""  # the reason behind a missing capability, quoted by the errors


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("math", "tformer.attention.backends:math_attention", weights=True, scores=EXACT),
        Backend("sdpa", "tformer.attention.backends:sdpa_attention", scores=EXACT),
        Backend(
            "chunked",
            "tformer.attention.chunked:chunked_attention",
            dropout=False,
            scores=EXACT,
            why="it never stores the weights dropout would act on",
        ),
        Backend(
            "local",
            "tformer.attention.local:local_attention",
            cross=False,
            scores=EXACT,
            masks="key_padding",
            options=("window",),
            reference_mask="tformer.attention.local:reference_mask",
            why="a window over source positions means nothing to a target query",
        ),
        Backend(
            "performer",
            "tformer.attention.performer:performer_attention",
            dropout=False,
            masks="key_padding",
            why="it approximates softmax(q.k / sqrt(D)) with random features and never forms the weights",
        ),
        Backend(
            "linformer",
            "tformer.attention.linformer:linformer_attention",
            causal=False,
            masks="key_padding",
            options=("rank", "max_seq_len"),
            params="tformer.attention.linformer:linformer_parameters",
            why="it mixes all positions into each projected key",
        ),
    )
}


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}") from None


def unsupported(
    backend: Backend, *, score: str = "dot", dropout: float = 0.0, causal: bool = False, cross: bool = False
) -> str | None:
    """Why `backend` cannot serve a use (a score function, attention dropout, causal attention,
    cross-attention), as the end of a sentence naming it; None when it can."""
    why = f" ({backend.why})" if backend.why else ""
    if score not in backend.scores:
        exact = ", ".join(n for n, b in BACKENDS.items() if score in b.scores)
        return (
            f"cannot compute attention_score = {score!r} (it approximates the dot-product softmax itself); "
            f"use one of {exact}"
        )
    if dropout > 0 and not backend.dropout:
        return f"does not support attention_dropout > 0{why}"
    if causal and not backend.causal:
        return f"cannot be causal{why}"
    if cross and not backend.cross:
        return f"cannot be cross-attention{why}"
    return None


def role(attention: str, explicit: str | None, *, causal: bool = False, cross: bool = False) -> str:
    """The backend of one attention role (a decoder's causal self-attention, cross-attention): `explicit`
    when the config names one; else `attention` where its entry declares the role, else "sdpa" (e.g. a
    translator with `local` self-attention attends to its whole source). Explicit names are checked by the
    config, never replaced."""
    if explicit is not None:
        return explicit
    spec = BACKENDS.get(attention)
    able = spec is not None and (spec.causal or not causal) and (spec.cross or not cross)
    return attention if able else "sdpa"
