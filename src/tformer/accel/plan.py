"""Which path each of a model's accelerated linear and dropout layers takes, per shape class, chosen by
measurement.

A shape class is (float32, train or inference, rows bucket "1" / "2-16" / ">16", out features, in
features). The first product of a class times its candidates on the call's own shapes, stock `F.linear`
against oneDNN (forward, or forward + backward when autograd wants the product), through the machine's
`Tuner` (accel/tune.py: a path wins only where it beat stock by more than the measurement's noise; the
choice is cached per machine, so a later process reads it instead of timing). The timing runs on
detached copies of the call's tensors: the caller's gradients, autograd graph and random streams are
untouched. Dropout has one class per dtype (not a size bucket, so that under torchrun every rank meets
it at the same call, whatever its batch's shape), timed on 2^20 elements of that dtype (a training
activation's size; a first call's own tensor may be small enough for the timing to be noise): stock
`F.dropout` against "bits16" (accel/dropout.py), forward and backward, with the CPU generator's state
restored after the timing.

A `Plan` belongs to one model (every `AccelLinear` of it holds the same one). Its `choices` are what the
model used, by shape class: a training run records them in its checkpoint and a resumed run gives them
back (`accel.apply(model, choices=...)`), so the resumed steps take the same kernels, bit for bit, even
if this machine's cache has since changed. Under torchrun the choices for training products are rank
0's (`agree`): every rank times, rank 0's winner is broadcast, so all ranks compute alike.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tformer.accel import attention as _attention
from tformer.accel import bucket as _bucket
from tformer.accel import compiled as _compiled
from tformer.accel import dropout as _dropout
from tformer.accel import int8 as _int8
from tformer.accel import linear as _linear
from tformer.accel.compiled import PLAIN as _PLAIN
from tformer.accel.machine import last_level_cache_bytes, rows_bucket
from tformer.accel.tune import Tuner
from tformer.attention.backends import sdpa_attention

# the paths of each op, by the first part of its class name; the first is stock
OP_PATHS = {
    "linear": ("stock", "onednn", "bucket", "dequant"),
    "dropout": ("stock", "bits16"),
    "attention": ("stock", "short"),
}
# bfloat16 autocast products: one class per train / inference (the kernel builds it avoids do not depend
# on the layer's size), timed on the first call's operands at row counts the process has not met
BF16_CLASS = "linear/bfloat16/{}/rows"
# torchao int8 weights in inference, products of several rows: torchao's own kernels ("stock") or
# `int8_dequant_linear`; one class per machine, as what decides is whether this CPU has fast int8
# products (AVX512-VNNI, AMX) at all
INT8_CLASS = "linear/int8/infer"
INT8_TIMED = (16, 1024)  # the timing's rows and most output features (a slice of the call's weight)
# One-row decoding products are timed on copies of their weight in turn (`streamed`), as a decoding step
# reads each weight from memory: timed on one weight, which then stays in the last-level cache, an AMD
# EPYC (32 MiB L3) put MKL's 768 x 768 product ahead of the compiled kernel (73 against 88 us) that was
# ahead from memory (136 against 191 us), as in the model's step. Verdicts so timed carry STREAMED.
STREAMED = "streamed"
STREAM_BYTES = 256 * 2**20
STREAM_COPIES = 64


def class_name(training: bool, bucket: str, n: int, k: int) -> str:
    """A shape class as recorded in checkpoints: "linear/float32/train/>16/2304x768"."""
    return f"linear/float32/{'train' if training else 'infer'}/{bucket}/{n}x{k}"


class Plan:
    """The paths of one model's accelerated layers (see the module's doc). `tuner` None: no measuring;
    classes without a recorded choice take the fixed rule (oneDNN from `ONEDNN_MIN_MNK` multiply-adds)."""

    def __init__(self, tuner: Tuner | None, choices: dict[str, str] | None = None) -> None:
        self._start(tuner, choices)

    def _start(self, tuner: Tuner | None, choices: dict[str, str] | None) -> None:
        self.tuner = tuner
        self.choices: dict[str, str] = {}
        self.agree: Callable[[str, str], str] | None = None  # (class, local winner) -> the winner to use
        # the same, keyed for the hot path: (training, rows bucket, n, k), ("bf16", training) or
        # ("dropout", dtype)
        self._fast: dict[tuple[object, ...], str] = {}
        self._lock = threading.Lock()
        if choices:
            self.update(choices)

    def __deepcopy__(self, memo: dict[int, object]) -> Plan:
        """A copied model (copy.deepcopy) gets a plan of its own, with this one's tuner and choices."""
        new = Plan(self.tuner, self.choices)
        new.agree = self.agree
        return new

    def __getstate__(
        self,
    ) -> dict[str, dict[str, str]]:  # pickled (a model sent to another process): choices only
        return {"choices": dict(self.choices)}

    def __setstate__(self, state: dict[str, dict[str, str]]) -> None:
        self._start(None, state["choices"])

    def update(self, choices: dict[str, str]) -> None:
        """Take recorded choices (a resumed run's), over any made here."""
        bad = {k: v for k, v in choices.items() if v not in OP_PATHS.get(k.split("/")[0], ())}
        if bad:
            expected = "; ".join(f"{op}/...: {', '.join(paths)}" for op, paths in OP_PATHS.items())
            raise ValueError(f"recorded accel choices name unknown paths {bad}; expected {expected}")
        with self._lock:
            self.choices.update(choices)
            self._fast.clear()

    def path(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> str:
        """The path for this float32 product (the caller checked oneDNN could compute it)."""
        n, k = weight.shape
        bucket = rows_bucket(max(1, x.numel() // k))
        fast = (training, bucket, n, k)
        got = self._fast.get(fast)
        if got is None:
            got = self._choose(class_name(training, bucket, n, k), x, weight, bias, training)
            self._fast[fast] = got
        return got

    def bf16_path(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> str:
        """ "bucket" or "stock" for a CPU bfloat16 autocast product (the caller checked
        `bucket_eligible`)."""
        fast = ("bf16", training)
        got = self._fast.get(fast)
        if got is None:
            name = BF16_CLASS.format("train" if training else "infer")
            got = self._decide(
                name, "stock", lambda: _bucket_candidates(x, weight, bias, training), collective=training
            )
            self._fast[fast] = got
        return got

    def int8_path(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> str:
        """ "dequant" or "stock" for an inference product of several rows with a torchao int8 weight (the
        caller checked `dequant_eligible`): one choice per machine (`INT8_CLASS`), timed on `INT8_TIMED`
        rows against the first output features of the call's own weight; stock without a tuner. One-row
        products keep their own paths (`decode_path`: the compiled kernel or torchao's): in a GPT-2
        decoding step on an AVX2 AMD EPYC the dequantised one-row products made the step 1.3x slower
        than torchao's, though alone they timed faster (the float32 product's threads and the
        conversion's hand over the cores at every call; decision 107)."""
        got = self._fast.get(("int8",))
        if got is None:
            got = self._decide(
                INT8_CLASS, "stock", lambda: _int8_candidates(x, weight, bias), collective=False
            )
            self._fast[("int8",)] = got
        return got

    def decode_path(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, measure: bool) -> str:
        """ "compiled" where this machine measured the compiled kernel faster than the layer's eager path
        for this one-row inference product (the caller checked `_one_row_inference`), else that eager
        path's name ("eager" or "addmv", `row_path`), or "unmeasured" where there is no verdict against
        it; `measure` (compile=True): time the compiled kernel against the eager path now if there is
        none. Verdicts are the machine's (the tuner's cache, keyed by the eager path they were timed
        against), not part of `choices`: decoding is not part of a training run's steps."""
        plain = type(weight) in _PLAIN
        n, k = weight.shape[0], weight.shape[-1]
        fast = ("decode", x.dtype, plain, n, k)
        got = self._fast.get(fast)
        if got is None or (measure and got == "unmeasured"):
            dtype = str(x.dtype).removeprefix("torch.") if plain else "int8"
            key = ("decode", dtype, int(n), int(k), STREAMED)
            if plain and n * k < _linear.ONEDNN_MIN_MNK:
                got = "eager"  # below the compiled kernel's size (`_gemv`)
            elif self.tuner is None:
                got = "unmeasured"
            else:
                eager = self.row_path(x, weight, bias)  # the eager candidate's own path, decided first
                if measure:
                    with _own_autograd():
                        candidates = _decode_candidates(x, weight, bias, self, eager)
                        got = self.tuner.choose(key, candidates, stock=eager)
                    # the default's kernel for this shape (`one_row`) was decided without this verdict
                    for old in [f for f in list(self._fast) if f[0] == "one" and f[4] == weight.shape]:
                        self._fast.pop(old, None)
                else:
                    got = self.tuner.lookup(key, stock=eager) or "unmeasured"
            self._fast[fast] = got
        return got

    def auto_compiles(self) -> bool:
        """Some one-row product of this model has a "compiled" verdict (`decode_path`): decoding by
        default (compile=None) would take a compiled kernel for it."""
        return any(key[0] == "decode" and got == "compiled" for key, got in list(self._fast.items()))

    def one_row(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, compiled: bool) -> str:
        """The kernel of a one-row inference product (the caller checked `_one_row_inference`), decided
        once per (dtype, weight kind, shape, bias or not, `compiled` allowed) and then a dict lookup, as
        it runs 49 times per GPT-2 token: "compiled" (`compiled` and `decode_path` says so), "addmv"
        (`row_path`), "stock" (`F.linear`: what `eager_linear` would take), or "eager" (`eager_linear`:
        oneDNN where this class chose it)."""
        fast = ("one", x.dtype, weight.dtype, type(weight), weight.shape, bias is None, compiled)
        got = self._fast.get(fast)
        if got is None:
            if compiled and self.decode_path(x, weight, bias, measure=False) == "compiled":
                got = "compiled"
            elif self.row_path(x, weight, bias) == "addmv":
                got = "addmv"
            elif not _linear.onednn_eligible(x, weight, bias) or self.path(x, weight, bias, False) == "stock":
                got = "stock"
            else:
                got = "eager"
            self._fast[fast] = got
        return got

    def row_path(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> str:
        """ "addmv" or "eager" for a one-row inference product not served by a compiled kernel (the caller
        checked `_one_row_inference`): the matrix-vector product against the layer's eager path, timed at
        first use (no compiling, microseconds a call) as class ("decode-eager", dtype, n, k) and cached
        per machine; "eager" without a tuner or where `addmv_row` does not apply."""
        fast = ("row", x.dtype, type(weight) in _PLAIN, weight.shape[0], weight.shape[-1])
        got = self._fast.get(fast)
        if got is None:
            if self.tuner is None or not _linear.addmv_eligible(x, weight, bias):
                got = "eager"
            else:
                n, k = int(weight.shape[0]), int(weight.shape[-1])
                key = ("decode-eager", str(x.dtype).removeprefix("torch."), n, k, STREAMED)
                with _own_autograd():
                    got = self.tuner.choose(key, _row_candidates(x, weight, bias, self), stock="eager")
            self._fast[fast] = got
        return got

    def dropout_path(self, x: Tensor, p: float) -> str:
        """The path for training-mode dropout of `x` (the caller checked "bits16" could compute it)."""
        fast = ("dropout", x.dtype)
        got = self._fast.get(fast)
        if got is None:
            got = self._choose_dropout(f"dropout/{str(x.dtype).removeprefix('torch.')}/train", x.dtype, p)
            self._fast[fast] = got
        return got

    def attention_path(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float | None
    ) -> str:
        """The path of a float32 training attention call (the caller checked it is one, of at most
        SHORT_FP32_KEYS keys): "short" (accel/attention.py's three products) or "stock" (the fused kernel),
        per key-length class, timed on this first call's shapes."""
        cls = _attention.key_class(k.shape[-2])
        fast = ("attention", q.dtype, cls)
        got = self._fast.get(fast)
        if got is None:
            name = f"attention/{str(q.dtype).removeprefix('torch.')}/train/keys<={cls}"
            got = self._decide(
                name, "stock", lambda: _attention_candidates(q, k, v, mask, causal, scale), collective=True
            )
            self._fast[fast] = got
        return got

    def _choose_dropout(self, name: str, dtype: torch.dtype, p: float) -> str:
        # no tuner: stock, masks as torch draws them
        return self._decide(name, "stock", lambda: _dropout_candidates(dtype, p), collective=True)

    def _choose(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> str:
        rows = max(1, x.numel() // weight.shape[1])
        fixed = "onednn" if rows * weight.shape[0] * weight.shape[1] >= _linear.ONEDNN_MIN_MNK else "stock"
        return self._decide(name, fixed, lambda: _candidates(x, weight, bias, training), collective=training)

    def _decide(
        self,
        name: str,
        fixed: str,
        candidates: Callable[[], dict[str, Callable[[], object]]],
        *,
        collective: bool,
    ) -> str:
        """The recorded choice for class `name`; else the tuner's (timing `candidates()`), or `fixed`
        without a tuner; a training class (`collective`) then goes through `agree` (torchrun: rank 0's)."""
        with self._lock:
            recorded = self.choices.get(name)
        if recorded is not None:
            return recorded
        winner = fixed
        if self.tuner is not None:
            with _own_autograd():
                winner = self.tuner.choose(tuple(name.split("/")), candidates(), stock="stock")
        if collective and self.agree is not None:
            winner = self.agree(name, winner)
        with self._lock:
            return self.choices.setdefault(name, winner)


def _keep(t: Tensor) -> Tensor:
    return t


def _own_autograd() -> torch.autograd.graph.saved_tensors_hooks:
    """The timing's autograd graphs keep their own tensors: a first product met inside a checkpointed
    layer's forward (train.checkpoint_activations) would otherwise run its timed forward + backward under
    the checkpoint's saved-tensor hooks, which torch refuses ("target_frame.early_stop is set")."""
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def _candidates(
    x: Tensor, weight: Tensor, bias: Tensor | None, training: bool
) -> dict[str, Callable[[], object]]:
    """Stock and oneDNN, each computing this product (and, training, its gradients) on detached copies."""
    xs = x.detach()
    w = weight.detach()
    b = None if bias is None else bias.detach()
    if not training:

        def infer(fn: Callable[..., Tensor]) -> Callable[[], object]:
            def run() -> Tensor:
                with torch.no_grad():
                    return fn(xs, w, b)

            return run

        return {"stock": infer(F.linear), "onednn": infer(_linear.onednn_linear)}
    xs, w = xs.clone().requires_grad_(), w.requires_grad_()
    b = None if b is None else b.requires_grad_()
    grad = torch.randn(
        *x.shape[:-1], weight.shape[0], generator=torch.Generator().manual_seed(0), dtype=x.dtype
    )
    inputs = [t for t in (xs, w, b) if t is not None]

    def step(fn: Callable[..., Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.enable_grad():
                return torch.autograd.grad(fn(xs, w, b), inputs, grad)

        return run

    return {"stock": step(F.linear), "onednn": step(_linear.onednn_linear)}


def streamed(weight: Tensor, bias: Tensor | None) -> Callable[[], tuple[Tensor, Tensor | None]]:
    """A function that returns (weight, bias) or one of its copies, in turn, so that each timed one-row
    product reads its weight from memory as a decoding step does, not from the last-level cache where the
    previous call left it: copies enough for twice that cache, at most `STREAM_BYTES` in all and
    `STREAM_COPIES` of them; the weight alone where it is bigger, or not a plain tensor (torchao's)."""
    pairs = [(weight, bias)]
    if type(weight) in _PLAIN:
        nbytes = max(1, weight.numel() * weight.element_size())
        target = min(2 * last_level_cache_bytes(), STREAM_BYTES)
        n = max(1, min(STREAM_COPIES, -(-target // nbytes)))
        pairs += [(weight.clone(), None if bias is None else bias.clone()) for _ in range(n - 1)]
    turn = itertools.cycle(pairs)
    return lambda: next(turn)


def _decode_candidates(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: Plan, eager: str
) -> dict[str, Callable[[], object]]:
    """This one-row product by the layer's eager path (stock, oneDNN or addmv, as `plan` chose; named
    `eager`) and by its compiled kernel (excluded where it has none), in inference, each call on the next
    of `streamed`'s copies."""
    xs = x.detach()
    pair = streamed(weight, bias)  # one turn for both: the round-robin alternates them over the copies

    def by_eager() -> Tensor:
        w, b = pair()
        with torch.no_grad(), _compiled.compiled_decoding(False):
            return _linear.accel_linear(xs, w, b, plan)

    def compiled() -> Tensor:
        w, b = pair()
        with torch.no_grad():
            y = _linear.compiled_row(xs, w, b)
        if y is None:
            raise RuntimeError("no compiled kernel for this product here")
        return y

    return {eager: by_eager, "compiled": compiled}


def _row_candidates(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: Plan
) -> dict[str, Callable[[], object]]:
    """This one-row product by the layer's eager path and as a matrix-vector product, in inference, each
    call on the next of `streamed`'s copies."""
    xs = x.detach()
    pair = streamed(weight, bias)  # one turn for both, as in _decode_candidates

    def eager() -> Tensor:
        w, b = pair()
        with torch.no_grad():
            return _linear.eager_linear(xs, w, b, plan)

    def addmv() -> Tensor:
        w, b = pair()
        with torch.no_grad():
            return _linear.addmv_row(xs, w, b)

    return {"eager": eager, "addmv": addmv}


def _int8_candidates(x: Tensor, weight: Tensor, bias: Tensor | None) -> dict[str, Callable[[], object]]:
    """torchao's int8 product and `int8_dequant_linear` on `INT8_TIMED` rows of seeded activations times
    the first output features of this weight (torchao slices its int8 tensors), in inference."""
    rows, most = INT8_TIMED
    n = min(int(weight.shape[0]), most)
    w = weight[:n] if n < weight.shape[0] else weight
    b = None if bias is None else bias[:n].contiguous()
    xs = torch.randn(rows, x.shape[-1], generator=torch.Generator().manual_seed(0))

    def stock() -> Tensor:
        with torch.no_grad():
            return F.linear(xs, w, b)

    def dequant() -> Tensor:
        with torch.no_grad():
            if not _int8.dequant_eligible(xs, w, b):
                raise RuntimeError("this int8 weight's slice is not one int8_dequant_linear reads")
            return _int8.int8_dequant_linear(xs, w, b)

    return {"stock": stock, "dequant": dequant}


def _bucket_candidates(
    x: Tensor, weight: Tensor, bias: Tensor | None, training: bool
) -> dict[str, Callable[[], object]]:
    """Stock autocast and "bucket", each computing this layer's product (and, training, its gradients)
    under bfloat16 autocast on detached operands, every call at a row count not used before in this
    process: what length-bucketed batches meet step after step."""
    k, n = weight.shape[1], weight.shape[0]
    rows = max(1, x.numel() // k)
    spread = 4096  # distinct row counts available to the timing (it makes far fewer calls)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(rows + spread, k, generator=g).bfloat16()
    gout = torch.randn(rows + spread, n, generator=g).bfloat16()
    w = weight.detach().clone().requires_grad_(training)
    b = None if bias is None else bias.detach().clone().requires_grad_(training)
    calls = iter(range(1, 1 << 62))

    def fresh(fn: Callable[..., Tensor]) -> Callable[[], object]:
        def run() -> object:
            m = rows + next(calls) % spread
            xs = big[:m].detach().requires_grad_(training)
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
                y = fn(xs, w, b)
                if not training:
                    return y
                inputs = [t for t in (xs, w, b) if t is not None]
                return torch.autograd.grad(y, inputs, gout[:m])

        return run

    return {"stock": fresh(F.linear), "bucket": fresh(_bucket.bucketed_linear)}


def _attention_candidates(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float | None
) -> dict[str, Callable[[], object]]:
    """The fused kernel ("stock") and the three products ("short"), forward and backward, on random
    tensors of this call's shapes and strides with its mask (no dropout: the caller's random stream is not
    drawn). The strides matter: attention's q, k and v are transposed views of the projections' (B, T, C)
    outputs, which the fused kernel reads in place and the products copy first."""
    g = torch.Generator().manual_seed(0)

    def like(t: Tensor) -> Tensor:  # a leaf laid out as `t` (a view's strides; storage of its extent)
        if 0 in t.stride():  # a broadcast view: its elements share memory, which a leaf cannot
            return torch.randn(t.shape, generator=g).requires_grad_()
        leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        return leaf.copy_(torch.randn(t.shape, generator=g)).requires_grad_()

    qs, ks, vs = like(q), like(k), like(v)
    m = None if mask is None else mask.detach()
    grad = torch.randn(*q.shape[:-1], v.shape[-1], generator=g)

    def step(fn: Callable[[], Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.enable_grad():
                return torch.autograd.grad(fn(), (qs, ks, vs), grad)

        return run

    return {
        "stock": step(lambda: sdpa_attention(qs, ks, vs, m, causal=causal, scale=scale)[0]),
        "short": step(lambda: _attention._short_lowp_cpu(qs, ks, vs, m, causal, 0.0, scale)),
    }


def _dropout_candidates(dtype: torch.dtype, p: float) -> dict[str, Callable[[], object]]:
    """Stock and "bits16" dropout, forward and backward, on 2^20 elements of `dtype`; each restores the
    CPU generator's state afterwards, so the caller's masks are drawn as if no timing had happened."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(_dropout.TIMED_NUMEL, generator=g).to(dtype).requires_grad_()
    grad = torch.ones_like(xs)

    def step(fn: Callable[[Tensor], Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                return torch.autograd.grad(fn(xs), xs, grad)

        return run

    return {
        "stock": step(lambda t: F.dropout(t, p, True)),
        "bits16": step(lambda t: _dropout.bits16_dropout(t, p)),
    }
