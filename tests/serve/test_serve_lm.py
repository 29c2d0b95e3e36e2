"""The language model's endpoints against TextGenerator.generate on the same checkpoint, one request at a
time: greedy and seeded sampling identical (concurrent requests in one continuous batch), stop strings,
OpenAI's completion objects and chunks, streaming = non-streamed; a request joins a batch that is
decoding; a client that disconnects mid-stream frees its row; the LM's own bad requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from support.serving import Gate, batches, events, posted_together, server_of, serving, until
from tformer.tasks import TextGenerator

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["to be", "whether tis", "t", "", "the question: "]


@pytest.fixture(scope="module")
def generator(checkpoint):
    return TextGenerator.load(checkpoint("lm"))


def test_greedy_and_seeded_sampling_equal_one_request_at_a_time(generator):
    sampled = dict(temperature=0.9, top_k=20, top_p=0.9)
    greedy = [generator.generate(p, max_new_tokens=12, greedy=True) for p in PROMPTS]
    seeded = [generator.generate(p, max_new_tokens=12, seed=i, **sampled) for i, p in enumerate(PROMPTS)]
    bodies = [{"prompt": p, "max_new_tokens": 12, "greedy": True} for p in PROMPTS]
    bodies += [{"prompt": p, "max_new_tokens": 12, "seed": i, **sampled} for i, p in enumerate(PROMPTS)]
    replies, server = posted_together(
        generator, "/v1/generate", bodies, max_batch=len(bodies), max_wait_ms=10_000
    )
    steps, rows = batches(server)
    assert [r.status_code for r in replies] == [200] * len(bodies)
    assert [r.json()["text"] for r in replies] == greedy + seeded
    assert rows / steps > 1  # the steps decoded several rows at once
    first = replies[0].json()
    assert first["finish_reason"] in ("length", "stop") and first["prompt_tokens"] == len(
        generator.prompt_ids(PROMPTS[0])
    )


def test_completions_are_openai_objects_with_stop_strings(generator):
    text = generator.generate("to be", max_new_tokens=20, greedy=True)
    stop = text[5:7]  # a string the greedy continuation meets
    cut = generator.generate("to be", max_new_tokens=20, greedy=True, stop=[stop])
    assert cut == text[: text.index(stop)]
    with serving(generator, max_wait_ms=0) as client:
        r = client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "to be", "max_tokens": 20, "temperature": 0, "stop": stop},
        )
        got = r.json()
        assert r.status_code == 200 and got["object"] == "text_completion" and got["model"] == "tiny"
        assert got["choices"] == [{"text": cut, "index": 0, "logprobs": None, "finish_reason": "stop"}]
        usage = got["usage"]
        assert usage["prompt_tokens"] == len(generator.prompt_ids("to be"))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        r = client.post("/v1/completions", json={"prompt": "to be", "max_tokens": 20, "temperature": 0})
        assert r.json()["choices"][0]["text"] == text and r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])
def test_streaming_equals_the_non_streamed_text(generator, path):
    tokens = "max_new_tokens" if path == "/v1/generate" else "max_tokens"
    bodies = [
        {"prompt": "to be", tokens: 30, "seed": 3, "temperature": 0.8},
        {"prompt": "whether", tokens: 30, "seed": 5, "stop": ["e "]},
    ]
    with serving(generator, max_wait_ms=0) as client:
        for body in bodies:
            whole = client.post(path, json=body).json()
            with client.stream("POST", path, json={**body, "stream": True}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                got = events(r.iter_lines())
            assert got[-1] == "[DONE]"
            if path == "/v1/generate":
                assert "".join(e["text"] for e in got[:-1]) == whole["text"]  # type: ignore[index]
                assert got[-2]["finish_reason"] == whole["finish_reason"]  # type: ignore[index]
            else:
                choices = [e["choices"][0] for e in got[:-1]]  # type: ignore[index]
                assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
                assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
                assert choices[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
                assert len({e["id"] for e in got[:-1]}) == 1  # type: ignore[index]


def test_a_request_joins_a_batch_that_is_decoding(generator):
    long = {"prompt": "to be", "max_new_tokens": 40, "greedy": True}
    short = {"prompt": "t", "max_new_tokens": 3, "greedy": True}
    with serving(generator, max_batch=4, max_wait_ms=0) as client:
        server = server_of(client)
        gate = Gate(server.service.engine)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/generate", json=long)
            until(lambda: len(server.worker.jobs) == 1, "decoding the first request")
            gate.let(2)  # the first request's prompt and a token or two: it is mid-decoding
            second = pool.submit(client.post, "/v1/generate", json=short)
            until(lambda: server.batcher.free == 2, "the second request handed to the worker")
            gate.let(1)  # the step the worker was held before; then it takes the second request in
            until(lambda: len(server.worker.jobs) == 2, "the second request in the running batch")
            gate.let(100)
            assert first.result().json()["text"] == generator.generate(
                "to be", max_new_tokens=40, greedy=True
            )
            assert second.result().json()["text"] == generator.generate("t", max_new_tokens=3, greedy=True)


def test_a_client_that_disconnects_mid_stream_frees_its_row(generator):
    with serving(generator, max_batch=2, max_wait_ms=0) as client:
        server = server_of(client)
        engine = server.service.engine
        gate = Gate(engine)
        gate.let(1)
        with client.stream(
            "POST",
            "/v1/generate",
            json={"prompt": "to be", "max_new_tokens": 50, "stream": True, "greedy": True},
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first text: the request is decoding
        until(lambda: all(j.cancelled for j in server.worker.jobs), "cancelled")  # the client went away
        gate.let(100)
        until(lambda: server.batcher.free == 2 and not server.worker.jobs, "the row free")
        assert engine.active == 0 and len(engine.decoder()) == 0
        generated = server.metrics.tokens.collect()[0].samples[0].value
        assert generated < 50  # it stopped decoding the cancelled request
        r = client.post("/v1/generate", json={"prompt": "to", "max_new_tokens": 5, "greedy": True})
        assert r.json()["text"] == generator.generate("to", max_new_tokens=5, greedy=True)


def test_the_lm_endpoints_refuse_what_does_not_fit(generator):
    limit = generator.model.config.max_seq_len
    with serving(generator, max_wait_ms=0) as client:
        cases = [
            (
                "/v1/generate",
                {"prompt": "x" * (limit + 1)},
                "prompt",
                f"more than the model's max_seq_len = {limit}",
            ),
            (
                "/v1/generate",
                {"prompt": "to", "max_new_tokens": 4097},
                "max_new_tokens",
                "expected 0 to 4096",
            ),
            ("/v1/completions", {"prompt": "to", "max_tokens": -1}, "max_tokens", "out of range"),
            ("/v1/completions", {"prompt": "to", "temperature": 2.5}, "temperature", "<= 2.0"),
            ("/v1/completions", {"prompt": "to", "top_p": 0}, "top_p", "> 0.0"),
            ("/v1/completions", {"prompt": "to", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
            ("/v1/completions", {"prompt": "to", "stop": [""]}, "stop", "non-empty strings"),
            ("/v1/completions", {"prompt": "to", "seed": -1}, "seed", "out of range"),
            ("/v1/completions", {"prompt": "to", "n": 2}, "n", "unknown parameter 'n'"),
            ("/v1/completions", {"prompt": ["to"]}, "prompt", "an array; expected a string"),
            ("/v1/generate", {"prompt": "to", "top_k": 0}, "top_k", "out of range"),
        ]
        for path, body, field, phrase in cases:
            r = client.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
            assert phrase in r.json()["error"]["message"], r.text
        assert (
            client.post("/v1/completions", json={"prompt": "to", "max_tokens": 0}).json()["choices"][0][
                "text"
            ]
            == ""
        )


def test_a_baseline_lm_is_refused_with_the_reason(generator):
    from tformer.config import LMConfig
    from tformer.models.rnn import RNNLanguageModel
    from tformer.serve import ServeOptions
    from tformer.serve.app import create_app

    config = LMConfig(vocab_size=generator.tok.vocab_size, d_model=16, n_layers=1, architecture="lstm")
    baseline = TextGenerator(RNNLanguageModel(config), generator.tok)
    with pytest.raises(ValueError, match="the lstm baseline has no per-row cache"):
        create_app(baseline, ServeOptions(), name="rnn")


@pytest.fixture(scope="module")
def client(generator):
    with serving(generator, max_wait_ms=0) as c:
        yield c


VALUES = (
    st.none() | st.booleans() | st.integers(-3, 30) | st.sampled_from([4097, 2**70]) | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.lists(st.text(max_size=3), max_size=5)
)  # fmt: skip
FIELDS = ["model", "prompt", "max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "greedy"]
FIELDS += ["stop", "seed", "stream", "n"]


@pytest.mark.fuzz
@given(
    path=st.sampled_from(["/v1/generate", "/v1/completions"]),
    body=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6),
)
def test_no_request_body_gives_a_5xx(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code in (200, 400), r.text
    if r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
    elif r.status_code == 400:
        assert r.json()["error"]["field"] in FIELDS, r.text
