"""Continuous batching of text generation (tformer.inference.batching): many requests with their own
max_new_tokens, temperature, top_k, top_p, stop strings and seeds, decoded together while others join and
leave, each give exactly the text of `TextGenerator.generate` run alone (the reference): greedy and seeded
sampling alike, through EOS, stop strings, prompts longer than max_seq_len and contexts that outgrow it."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from support.decoding import context_sensitive
from support.models import generator
from tformer.config import LMConfig
from tformer.inference.batching import BatchDecoder, GenerationRequest, StepEvent
from tformer.models.rnn import RNNLanguageModel
from tformer.tasks import TextGenerator

REQUESTS = [
    GenerationRequest("the cat", max_new_tokens=9, greedy=True),
    GenerationRequest("a", max_new_tokens=14, seed=3, temperature=0.7),
    GenerationRequest("", max_new_tokens=5, seed=1, top_p=0.8),
    GenerationRequest("the black dog", max_new_tokens=11, seed=5, top_k=4, stop=("e", "ou")),
    GenerationRequest("is", max_new_tokens=12, greedy=True, stop=("a",)),
    GenerationRequest("big", max_new_tokens=0, seed=2),
]


def alone(gen: TextGenerator, r: GenerationRequest) -> str:
    return gen.generate(
        r.prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        greedy=r.greedy, seed=r.seed, stop=r.stop,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gen():
    return context_sensitive(generator(4))


def test_batch_equals_each_request_alone(gen):
    assert gen.generate_batch(REQUESTS) == [alone(gen, r) for r in REQUESTS]


def test_requests_join_and_leave_between_steps(gen):
    """Two requests start, three join after two steps (more than the free rows: the rest wait), a running
    one is cancelled mid-way; every finished text is its request's alone, and a cancelled request frees its row at once."""
    dec = gen.batch_decoder(max_batch=3)
    texts: dict[int, str] = {}
    done: dict[int, str] = {}

    def run(events):
        for e in events:
            texts[e.handle] = texts.get(e.handle, "") + e.text
            assert e.tokens <= REQUESTS[order[e.handle]].max_new_tokens
            if e.finished:
                done[e.handle] = e.reason

    order = {}
    for i in (0, 1):
        order[dec.add(REQUESTS[i])] = i
    run(dec.step())
    run(dec.step())
    for i in (3, 4, 2):
        order[dec.add(REQUESTS[i])] = i
    assert dec.waiting == 3 and dec.running == 2 - len(done)  # admitted at the next step
    run(dec.step())
    assert dec.running <= 3 and dec.waiting >= 2 - len(done) and len(dec) == dec.running + dec.waiting
    cancelled = next(h for h, i in order.items() if h not in done and i in (1, 3, 4))
    running = dec.running
    assert dec.cancel(cancelled) and dec.running == running - 1 and dec.free == 3 - dec.running
    assert not dec.cancel(cancelled)
    while len(dec):
        run(dec.step())
    for h, i in order.items():
        if h != cancelled:
            assert texts[h] == alone(gen, REQUESTS[i]), REQUESTS[i]
            assert done[h] in ("stop", "eos", "length")
    assert cancelled not in done


def test_long_prompts_and_contexts_past_max_seq_len(gen):
    """A prompt longer than max_seq_len (24) is read from its last 24 tokens, and a context that fills the
    window re-reads its last half, as `generate` does alone."""
    limit = gen.model.config.max_seq_len
    requests = [
        GenerationRequest("the black cat sleeps on the red carpet", max_new_tokens=6, greedy=True),
        GenerationRequest("a white", max_new_tokens=3 * limit, greedy=True),
        GenerationRequest("the house", max_new_tokens=2 * limit, seed=9),
    ]
    assert gen.generate_batch(requests, max_batch=2) == [alone(gen, r) for r in requests]


def test_events_and_reasons(gen):
    """One event per request per step: a request with nothing to generate finishes when admitted; the
    others count their tokens and finish once, with the reason that ended them."""
    dec = gen.batch_decoder()
    request = GenerationRequest("the cat", max_new_tokens=4, seed=0)
    h = dec.add(request)
    zero = dec.add(GenerationRequest("the", max_new_tokens=0))
    first = dec.step()
    assert first[0] == StepEvent(zero, "", True, "length", 0)
    seen = [e for e in first if e.handle == h]
    while len(dec):
        seen += dec.step()
    assert [e.handle for e in seen] == [h] * len(seen)
    assert [e.tokens for e in seen] == list(range(1, len(seen) + 1))
    assert [e.finished for e in seen] == [False] * (len(seen) - 1) + [True]
    assert seen[-1].reason == ("length" if len(seen) == 4 else "eos")
    assert "".join(e.text for e in seen) == alone(gen, request)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", -1, "max_new_tokens must be an int >= 0"),
        ("temperature", 0.0, "temperature must be a number > 0"),
        ("top_p", 1.5, r"top_p must be a number in \(0, 1\]"),
        ("top_k", 0, "top_k must be an int >= 1"),
        ("seed", "x", "seed must be an int in"),
        ("seed", 2**64, "seed must be an int in"),
        ("stop", "abc", "stop must be a sequence of strings"),
        ("prompt", 3, "prompt must be a str"),
    ],
)
def test_bad_requests_name_the_field(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GenerationRequest(**{"prompt": "a", field: value})


def test_rnn_baselines_are_refused(gen):
    c = LMConfig(vocab_size=gen.tok.vocab_size, d_model=16, n_layers=1, architecture="lstm", max_seq_len=24)
    with pytest.raises(TypeError, match="RNN baselines decode one request at a time"):
        BatchDecoder(RNNLanguageModel(c).eval(), gen.tok)


def test_single_request_path_is_unchanged(gen, monkeypatch):
    """`generate` of one prompt runs the uniform cache (no per-row lengths, no mask) as before batching."""
    from tformer.attention.kv_cache import KVCache

    seen = []
    real = KVCache.append

    def spy(self, k, v):
        seen.append(self.lengths is None)
        return real(self, k, v)

    monkeypatch.setattr(KVCache, "append", spy)
    torch.manual_seed(0)
    gen.generate("the", max_new_tokens=5, greedy=True)
    assert seen and all(seen)


ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True), st.text(max_size=4),
    st.lists(st.text(max_size=3), max_size=3), st.tuples(st.integers()),
)  # fmt: skip


@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            k: ANY
            for k in ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "greedy", "seed", "stop")
        },
    )
)
def test_any_request_is_accepted_or_refused_by_name(fields):
    """Untrusted request fields (the server passes JSON values through): a request is either valid, or a
    ValueError / TypeError naming the field; nothing else escapes."""
    fields.setdefault("prompt", "a")
    try:
        request = GenerationRequest(**fields)
    except (ValueError, TypeError) as exc:
        assert str(exc).split(" ", 1)[0] in fields, exc
        return
    assert isinstance(request.stop, tuple) and request.max_new_tokens >= 0
