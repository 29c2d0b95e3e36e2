"""Text generation from a decoder-only language model: greedy or sampled (temperature, top-k, top-p),
incremental with the KV cache, reproducible with a seed.

With the cache the prompt is fed once (into a static cache, allocated once for prompt + new tokens) and
each step feeds one token; without it every step re-reads the whole context, and the two give the same tokens while the text fits in `max_seq_len`. Past that, the
uncached path slides a window of the last `max_seq_len` tokens per step; the cached path re-reads the last
`max_seq_len // 2` tokens once and goes on caching (so its context is between half and all of the window),
which keeps each step cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

from tformer.accel import (
    AccelLinear,
    compiled_decoding,
    confirm_decoding,
    confirm_graph,
    decode_graph,
    decoding_graph,
    decoding_setting,
)
from tformer.accel.decode_graph import DecodeGraph
from tformer.attention.kv_cache import DecodingCache
from tformer.config import LMConfig
from tformer.inference.modes import evaluating
from tformer.models.lm import LMOutput


class GenerationCache(DecodingCache, Protocol):
    """A language model's cache as generation uses it: a `DecodingCache` of at most `capacity` positions,
    which `clear()` empties (keeping its buffers) when the text outgrows it."""

    @property
    def capacity(self) -> int: ...

    def clear(self) -> None: ...


G = TypeVar("G", bound=GenerationCache)


class IncrementalLM(Protocol[G]):
    """What `generate` needs of a language model (LanguageModel, RNNLanguageModel): a cache of type G and a
    forward pass that continues after the cached positions."""

    @property
    def config(self) -> LMConfig: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def eval(self) -> object: ...

    def new_cache(self, capacity: int | None = None) -> G: ...

    def __call__(
        self, ids: Tensor, *, cache: G | None = None, last_only: bool = False, checked: bool = False
    ) -> LMOutput: ...


SEEDS = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def check_sampling(
    *, temperature: object, top_k: object, top_p: object, seed: object, greedy: bool = False
) -> None:
    """Raise a ValueError naming the field for sampling parameters that `filter_logits` / a generator
    would refuse (or overflow on): untrusted values (a server's request) fail here, before decoding."""
    t = temperature  # greedy decoding never divides by it (0 is a usual way to ask for greedy)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 or (greedy and t == 0)):
        raise ValueError(f"temperature must be a number > 0 (or 0 with greedy=True), got {t!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not SEEDS[0] <= seed < SEEDS[1]
    ):
        raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {seed!r}")


@dataclass(frozen=True)
class Sampling:
    """Draw each token from the filtered distribution instead of taking the most probable one (a
    translator's sampling; the language model's requests carry the same fields). `seed`: this row's own
    generator (None: freshly seeded)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)

    def draw(self, logits: Tensor, generator: torch.Generator) -> Tensor:
        """(1, V) logits (or log-probabilities) -> (1,) token."""
        return sample(logits, generator, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def filter_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """(N, V) logits -> logits with everything outside the top-k / nucleus set to -inf, divided by temperature.

    top-p keeps the smallest set of most probable tokens whose probabilities sum to at least p
    (Holtzman et al., 2020); the most probable token is always kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = probs.cumsum(-1) - probs  # probability mass strictly above each token
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_compile(model: IncrementalLM[G], compile: bool | None) -> None:
    if compile and not any(isinstance(m, AccelLinear) for m in model.modules()):
        raise ValueError(
            "compile=True compiles tformer.accel's decoding kernels, and this model has none: call "
            "tformer.accel.apply(model) first (TFORMER_ACCEL=off in the environment turns them off)"
        )


def generate(
    model: IncrementalLM[G],
    prompt: Tensor,
    *,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    stop: Callable[[Tensor], bool] | None = None,
    compile: bool | None = None,
) -> Tensor:
    """prompt (B, T0) ids -> (B, T0 + n) ids, n <= max_new_tokens. Stops early when every row has produced
    `eos_id`, or when `stop(ids)` returns True (e.g. a stop string appeared). `compile=True`: one-row
    float32, bfloat16 and int8 CPU decoding steps use compiled matrix-vector kernels (tformer.accel; a few
    seconds of compiling per process, then faster steps; each weight shape's kernel is also timed against
    the eager path once and the verdict cached for this machine), which needs a model given tformer's
    accelerated layers (`tformer.accel.apply(model)`; at batch 1 the whole step as the default would take
    it is then also timed against the eager one, once per machine); None (the default): compiled where
    this machine's cache says it measured faster, both alone and in this model's decoding step, else
    eager; False: never. The model runs in eval mode; one already in it
    is not written to, so threads may share it (tformer.inference.modes)."""
    ids = prompt
    for ids in generate_steps(
        model, prompt, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, use_cache=use_cache, compile=compile,
    ):  # fmt: skip
        # Host reads only for what stopping needs: none without a stop callback.
        if stop is not None and stop(ids):
            break
    return ids


def generate_steps(
    model: IncrementalLM[G],
    prompt: Tensor,
    *,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    compile: bool | None = None,
) -> Iterator[Tensor]:
    """`generate` one token at a time: yields the ids so far (B, T0 + n) after each new token (a view
    that the next step extends, so copy what you keep), ending after max_new_tokens or once every row
    has produced `eos_id`; the consumer stops it early by not asking for more (streaming). The same
    kernels and tokens as `generate`. Grad mode and `compiled_decoding(compile)` (thread- and
    context-local) are set around each model call only, never across a yield, so the consumer's code
    between tokens runs in its own modes."""
    check_compile(model, compile)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt has shape {tuple(prompt.shape)}; expected (B, T) with at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return _steps(
        model, prompt, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
        top_k=top_k, top_p=top_p, generator=new_generator(seed, prompt.device), eos_id=eos_id,
        use_cache=use_cache, compile=decoding_setting(model, compile),
    )  # fmt: skip


def _steps(
    model: IncrementalLM[G],
    prompt: Tensor,
    *,
    max_new_tokens: int,
    greedy: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
    eos_id: int | None,
    use_cache: bool,
    compile: bool | None,
) -> Iterator[Tensor]:
    limit = model.config.max_seq_len
    b, n = prompt.shape  # n: filled columns
    # The output ids, allocated once: the prompt, then one column written per step.
    ids = torch.empty(b, n + max_new_tokens, dtype=prompt.dtype, device=prompt.device)
    ids[:, :n] = prompt
    cache: G | None = None
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    # compile=True at batch 1: after the first decoding step measured each product's kernels, the whole
    # step as the default takes it is timed against the eager one, once per machine (confirm_decoding)
    confirm = compile is True and use_cache and b == 1
    # the whole step as one compiled graph, at batch 1 where compile=True or this machine measured it
    # faster (accel.decoding_graph); the first decoding step runs the kernels (compile=True measures them)
    graph = (
        decoding_graph(model, compile, b, max_new_tokens)
        if use_cache and isinstance(model, nn.Module)
        else None
    )
    with evaluating(model):
        for _ in range(max_new_tokens):
            with compiled_decoding(compile), torch.no_grad():
                if use_cache:
                    if cache is None:  # the prompt (its last max_seq_len tokens), once, into a static cache
                        cache = model.new_cache(min(limit, n + max_new_tokens))
                        out = model(ids[:, max(0, n - limit) : n], cache=cache, last_only=True)
                    elif cache.length >= cache.capacity:  # full: re-read the last half window, once
                        cache.clear()
                        out = model(ids[:, n - limit // 2 : n], cache=cache, last_only=True, checked=True)
                    elif graph is not None and not confirm and 2 <= cache.length < cache.capacity - 1:
                        # (the graph is traced for these lengths: 0 and 1 specialise, as does filling the
                        # cache's last slot; those steps take the kernels and compile nothing more)
                        logits = _graph_step(model, graph, _token(ids, n), cache)
                        if logits is None:  # it did not compile: the kernels from now on
                            graph = None
                            out = model(ids[:, n - 1 : n], cache=cache, last_only=True, checked=True)
                        else:
                            out = LMOutput(logits, cache)
                    else:  # the token chosen last step: valid by construction, not checked again
                        out = model(ids[:, n - 1 : n], cache=cache, last_only=True, checked=True)
                        if confirm and cache.length < cache.capacity:
                            confirm = False
                            confirm_decoding(model, _trial_step(model, ids[:, n - 1 : n], cache))
                            if graph is not None:
                                graph = _confirmed(model, graph, _token(ids, n), cache)
                else:
                    out = model(ids[:, max(0, n - limit) : n], last_only=True)
                logits = out.logits[:, -1].float()  # (B, V)
                if greedy:
                    token = logits.argmax(dim=-1)
                else:
                    token = sample(logits, generator, temperature=temperature, top_k=top_k, top_p=top_p)
                if eos_id is not None:
                    token = torch.where(done, torch.full_like(token, eos_id), token)
                    done |= token == eos_id
                ids[:, n] = token
            n += 1
            yield ids[:, :n]
            # Host reads only for what stopping needs: none without eos_id.
            if eos_id is not None and bool(done.all()):
                return


def _token(ids: Tensor, n: int) -> Tensor:
    """The last token of ids[:, :n] as a tensor of its own, strides (1, 1): the graph would otherwise
    relate the ids' row stride to the cache's capacity (the two are often equal) and compile again."""
    return ids[:, n - 1 : n].clone(memory_format=torch.contiguous_format)


def _graph_step(model: object, graph: DecodeGraph, token: Tensor, cache: DecodingCache) -> Tensor | None:
    """One decoding step by the compiled graph -> logits (B, 1, V); None where it did not compile (said
    once; the model decodes with its kernels from then on)."""
    assert isinstance(model, nn.Module)
    try:
        return graph(model, token, cache)
    except Exception as exc:  # noqa: BLE001 - whatever dynamo or inductor raise
        decode_graph.failed(model, exc)
        return None


def _confirmed(
    model: object, graph: DecodeGraph, token: Tensor, cache: GenerationCache
) -> DecodeGraph | None:
    """compile=True's first decoding step ran the kernels: compile the graph on a copy of the cache and
    measure it against them (once per machine); the graph, or None where it did not compile."""
    assert isinstance(model, nn.Module)
    if not 2 <= cache.length < cache.capacity - 1:  # (see _steps)
        return graph  # compiled at its first use instead, and not measured
    if _graph_step(model, graph, token, cache.clone()) is None:
        return None
    confirm_graph(model, graph, token, cache)
    return graph


def _trial_step(model: IncrementalLM[G], token: Tensor, cache: G) -> Callable[[bool | None], object]:
    """setting -> one decoding step of `token` under `compiled_decoding(setting)`, on a copy of `cache`
    (which has a free position): the caller's cache and ids are untouched."""

    def step(setting: bool | None) -> object:
        with compiled_decoding(setting), torch.no_grad():
            return model(token, cache=cache.clone(), last_only=True, checked=True)

    return step


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of its own for one generation: seeded, or (None) freshly seeded; the global RNG is left
    alone, so concurrent generations do not disturb each other's draws."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(
    logits: Tensor,
    generator: torch.Generator,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """(N, V) float logits -> (N,) tokens drawn from the filtered distribution with `generator`."""
    probs = torch.softmax(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
