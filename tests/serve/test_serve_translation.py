"""POST /v1/translate against the offline Translator on the same checkpoint: concurrent requests of mixed
lengths decoded together give what each sentence gets alone (greedy: one continuous batch; beam 4: one
search); streamed deltas join to the non-streamed translation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from support.serving import Gate, events, largest_batch, posted_together, server_of, serving, until
from tformer.data.synthetic import number_translation
from tformer.tasks import Translator

pytestmark = pytest.mark.usefixtures("one_thread")
SOURCES = [p.src for p in number_translation(40, 8, 0, seed=5, max_digits=3)["valid"]]


@pytest.fixture(scope="module")
def translator(checkpoint):
    return Translator.load(checkpoint("translation"))


@pytest.mark.parametrize("beam", [1, 4])
def test_a_batch_of_mixed_lengths_equals_each_sentence_alone(translator, beam):
    assert len({len(translator.src_tok.encode(s)) for s in SOURCES}) > 2  # lengths differ: padding is met
    alone = [translator.translate([s], beam_size=beam)[0] for s in SOURCES]
    # max_wait far above the test's time: the batch is formed by its size (all 8 requests), not by a clock
    bodies = [{"text": s, "beam_size": beam} for s in SOURCES]
    replies, server = posted_together(
        translator, "/v1/translate", bodies, max_batch=len(SOURCES), max_wait_ms=10_000
    )
    assert [r.status_code for r in replies] == [200] * len(SOURCES)
    assert [r.json()["translation"] for r in replies] == alone
    assert largest_batch(server) == len(SOURCES)  # all eight decoded together


@pytest.mark.parametrize("beam", [1, 4])
def test_streamed_deltas_join_to_the_translation(translator, beam):
    with serving(translator, max_wait_ms=0) as client:
        for source in SOURCES[:3]:
            whole = client.post("/v1/translate", json={"text": source, "beam_size": beam}).json()[
                "translation"
            ]
            with client.stream(
                "POST", "/v1/translate", json={"text": source, "beam_size": beam, "stream": True}
            ) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                got = events(r.iter_lines())
            assert got[-1] == "[DONE]" and got[-2] == {"translation": whole}
            assert "".join(e["delta"] for e in got[:-2]) == whole  # type: ignore[index]


def test_max_tokens_and_length_penalty_are_the_requests_own(translator):
    source = SOURCES[0]
    with serving(translator, max_wait_ms=0) as client:
        r = client.post(
            "/v1/translate", json={"text": source, "beam_size": 2, "length_penalty": 1.5, "max_tokens": 2}
        )
        assert (
            r.json()["translation"]
            == translator.translate([source], beam_size=2, length_penalty=1.5, max_len=2)[0]
        )


def test_beam_requests_arriving_during_a_search_start_the_next_one_together(translator):
    longest = max(SOURCES, key=lambda s: len(translator.translate([s], beam_size=4)[0].split()))
    others = [s for s in SOURCES if s != longest][:2]
    body = lambda text: {"text": text, "beam_size": 4}  # noqa: E731
    with serving(translator, max_batch=4, max_wait_ms=0) as client:
        server = server_of(client)
        engine = server.service.engine
        gate = Gate(engine)
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.post, "/v1/translate", json=body(longest))
            until(lambda: len(server.worker.jobs) == 1, "the first request in the worker")
            gate.let(1)  # its search starts and takes a step
            later = [pool.submit(client.post, "/v1/translate", json=body(s)) for s in others]
            until(lambda: server.batcher.free == 1, "the other two handed to the worker")
            gate.let(1)  # the step the worker was held before; then it admits them
            until(lambda: len(server.worker.jobs) == 3, "all three in the worker")
            gate.let(1)  # a step with them admitted: the first search still runs, so they wait
            until(lambda: gate.taken == 3, "the third step done")
            assert len(engine._searches) == 1 and len(engine._joining) == 2
            gate.let(1000)
            replies = [first.result(), *(f.result() for f in later)]
    assert [r.json()["translation"] for r in replies] == [
        translator.translate([s], beam_size=4)[0] for s in [longest, *others]
    ]
    assert engine._next == 2  # two searches: the first, then the other two together


def test_sampled_requests_in_one_batch_equal_each_alone(translator):
    from tformer.inference.sampling import Sampling

    draws = [Sampling(temperature=0.8, top_k=5, seed=i) for i in range(len(SOURCES))]
    alone = [
        translator.translate([s], beam_size=1, sampling=d)[0] for s, d in zip(SOURCES, draws, strict=True)
    ]
    bodies = [
        {"text": s, "sample": True, "temperature": 0.8, "top_k": 5, "seed": i} for i, s in enumerate(SOURCES)
    ]
    replies, server = posted_together(
        translator, "/v1/translate", bodies, max_batch=len(SOURCES), max_wait_ms=10_000
    )
    assert [r.json()["translation"] for r in replies] == alone
    assert largest_batch(server) == len(SOURCES)
    greedy = [translator.translate([s], beam_size=1)[0] for s in SOURCES]
    assert alone != greedy  # the draws are not the argmax


def test_sampling_fields_need_sample_and_one_hypothesis(translator):
    with serving(translator, max_wait_ms=0) as client:
        for body, field, phrase in [
            ({"text": "un", "temperature": 0.5}, "temperature", 'expected it with "sample": true'),
            ({"text": "un", "seed": 1}, "seed", 'expected it with "sample": true'),
            ({"text": "un", "sample": True, "beam_size": 4}, "beam_size", "expected beam_size 1 (or none)"),
            ({"text": "un", "sample": True, "temperature": 0}, "temperature", "> 0.0"),
        ]:
            r = client.post("/v1/translate", json=body)
            assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
            assert phrase in r.json()["error"]["message"], r.text
