"""Bad requests never hurt the server: each gets a 4xx in the one error shape naming the field and what was
expected, and the server goes on answering. Also the API key, /health's readiness, /metrics in
Prometheus' text format, the request timeout, and hypothesis over request bodies (never a 5xx)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from support.serving import server_of, serving, until
from tformer.tasks import Translator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def translator(checkpoint):
    return Translator.load(checkpoint("translation"))


@pytest.fixture(scope="module")
def client(translator):
    with serving(translator, max_wait_ms=0, max_body_bytes=4096) as c:
        yield c


def error(r, status, field, *phrases):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "field"}, body
    assert body["error"]["field"] == field, body
    for phrase in phrases:
        assert phrase in body["error"]["message"], body
    return body["error"]["message"]


def test_bad_requests_name_the_field_and_what_was_expected(client, translator):
    long = " ".join(["cent"] * (translator.model.config.max_seq_len + 1))
    limit = translator.model.config.max_seq_len
    post = lambda body: client.post("/v1/translate", content=body)  # noqa: E731
    error(post(b"{"), 400, None, "not valid JSON")
    error(post(b""), 400, None, "empty", "JSON object")
    error(post(b"\xff\xfe"), 400, None, "not UTF-8")
    error(post(b"[1, 2]"), 400, None, "an array", "expected a JSON object")
    error(post(b'{"text": "un", "length_penalty": NaN}'), 400, None, "NaN is not JSON")
    error(post(b"[" * 100_000 + b"]" * 100_000), 413, None, "over the server's limit of 4096 bytes")
    nested = b"[" * 2000 + b"]" * 2000  # under the size limit, deeper than the parser goes
    error(post(nested), 400, None, "nests too deeply")
    error(client.post("/v1/translate", json={}), 400, "text", "missing", "expected a string")
    error(client.post("/v1/translate", json={"text": 7}), 400, "text", "an integer (7)", "expected a string")
    error(client.post("/v1/translate", json={"text": ""}), 400, "text", "no tokens")
    error(
        client.post("/v1/translate", json={"text": long}),
        400,
        "text",
        f"more than the model's max_seq_len = {limit}",
    )
    error(post(b'{"text": "\\ud800"}'), 400, "text", "lone surrogate")  # JSON's escape of half a pair
    msg = error(
        client.post("/v1/translate", json={"text": "un", "beam": 2}), 400, "beam", "unknown parameter 'beam'"
    )
    assert "did you mean 'beam_size'" in msg
    error(
        client.post("/v1/translate", json={"text": "un", "beam_size": "4"}),
        400,
        "beam_size",
        "a string ('4')",
        "integer from 1 to 16",
    )
    error(client.post("/v1/translate", json={"text": "un", "beam_size": True}), 400, "beam_size", "a boolean")
    error(client.post("/v1/translate", json={"text": "un", "beam_size": 2.0}), 400, "beam_size", "a number")
    error(
        client.post("/v1/translate", json={"text": "un", "beam_size": 0}),
        400,
        "beam_size",
        "out of range; expected 1 to 16",
    )
    error(
        client.post("/v1/translate", json={"text": "un", "max_tokens": limit + 1}),
        400,
        "max_tokens",
        f"expected 1 to {limit}",
    )
    error(
        client.post("/v1/translate", json={"text": "un", "stream": "yes"}),
        400,
        "stream",
        "expected true or false",
    )
    error(client.post("/v1/translate", content=b"x" * 5000), 413, None, "(--max-body-bytes)")
    chunks = iter([b'{"text": "', b"un " * 3000, b'"}'])  # no Content-Length: the limit counts what arrives
    error(client.post("/v1/translate", content=chunks), 413, None, "4096 bytes")
    error(client.get("/v1/translate"), 405, None, "GET /v1/translate is not allowed; expected POST")
    error(client.post("/v1/nothing", json={}), 404, None, "no endpoint /v1/nothing")
    msg = error(client.post("/v1/completions", json={"prompt": "x"}), 404, None, "the lm family's endpoint")
    assert "holds a translation model (tiny): POST /v1/translate" in msg
    # ... and it goes on serving
    r = client.post("/v1/translate", json={"text": "deux"})
    assert r.status_code == 200 and r.json()["translation"] == translator.translate(["deux"])[0]


def test_a_request_past_its_timeout_gets_a_504_and_never_reaches_the_model(translator):
    # max_wait far above the timeout: a lone request waits for a batch-mate and its time runs out first
    # (2 s, not less: the two concurrent requests below must reach the queue within it, on a loaded machine)
    with serving(translator, max_batch=2, max_wait_ms=10_000, timeout_s=2.0) as client:
        error(client.post("/v1/translate", json={"text": "un"}), 504, None, "timeout of 2 s (--timeout)")
        with ThreadPoolExecutor(2) as pool:  # two fill a batch at once: served well within the timeout
            replies = list(pool.map(lambda s: client.post("/v1/translate", json={"text": s}), ["un", "deux"]))
        assert [r.status_code for r in replies] == [200, 200]
        until(lambda: server_of(client).batcher.free == 2, "every row free")


def test_the_api_key_is_required_everywhere_but_health(translator):
    with serving(translator, max_wait_ms=0, api_key="s3cret") as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = client.post("/v1/translate", json={"text": "un"}, headers=headers)
            error(r, 401, None, "Authorization: Bearer <key>")
            assert r.headers["www-authenticate"] == "Bearer"
            assert client.get("/metrics", headers=headers).status_code == 401
            assert client.post("/v1/generate", json={}, headers=headers).status_code == 401
        until(lambda: client.get("/health").status_code == 200, "ready")  # no key asked (503 while warming)
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/translate", json={"text": "un"}, headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200


def test_health_is_503_until_the_warm_up_is_done(translator):
    from starlette.testclient import TestClient

    from tformer.serve.app import create_app
    from tformer.serve.options import ServeOptions

    app = create_app(translator, ServeOptions(max_wait_ms=0), name="tiny")
    engine = app.state.server.service.engine
    gate, warmed = threading.Event(), []
    engine.warm_up = lambda n: (gate.wait(30), warmed.append(n))
    with TestClient(app) as client:
        r = client.get("/health")
        assert (
            r.status_code == 503
            and r.json()["status"] == "warming up"
            and "warming up" in r.json()["error"]["message"]
        )
        gate.set()
        until(lambda: client.get("/health").status_code == 200, "ready")
        assert client.get("/health").json() == {
            "status": "ready",
            "family": "translation",
            "model": "tiny",
            "max_batch": 32,
        }
        assert warmed == [32]


def test_metrics_parse_and_count(translator):
    with serving(translator, max_wait_ms=0) as client:
        for text in ("un", "deux", ""):
            client.post("/v1/translate", json={"text": text})
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        counts = {
            (s.labels["endpoint"], s.labels["status"]): s.value
            for s in families["tformer_requests"].samples
            if s.name.endswith("_total")
        }
        assert counts == {("/v1/translate", "200"): 2, ("/v1/translate", "400"): 1}
        errors = [s.value for s in families["tformer_errors"].samples if s.name.endswith("_total")]
        assert errors == [1]
        latency = {
            s.name: s.value for s in families["tformer_request_seconds"].samples if "bucket" not in s.name
        }
        assert latency["tformer_request_seconds_count"] == 3
        assert {
            "tformer_batch_size",
            "tformer_generated_tokens",
            "tformer_tokens_per_second",
            "tformer_ready",
        } <= set(families)
        assert [s.value for s in families["tformer_ready"].samples] == [1]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["text", "beam_size", "length_penalty", "max_tokens", "stream", "beam"]
FIELDS += ["sample", "temperature", "seed"]


@pytest.mark.fuzz
@given(
    body=st.dictionaries(
        st.sampled_from(FIELDS), JSON | st.sampled_from(["un", "deux cent", 1, 2, 0.5, True]), max_size=5
    )
)
def test_no_request_body_gives_a_5xx(client, body):
    r = client.post("/v1/translate", content=json.dumps(body).encode())
    assert r.status_code in (200, 400), r.text
    if r.headers["content-type"].startswith("text/event-stream"):  # "stream": true
        assert r.text.endswith("data: [DONE]\n\n")
    else:
        assert set(r.json()) == ({"translation"} if r.status_code == 200 else {"error"})


@pytest.mark.fuzz
@given(raw=st.binary(max_size=200))
def test_no_raw_body_gives_a_5xx(client, raw):
    r = client.post("/v1/translate", content=raw)
    assert r.status_code in (200, 400), r.text


def test_a_failed_warm_up_is_reported_by_health_and_requests_still_answered(translator, capsys):
    from starlette.testclient import TestClient

    from tformer.serve.app import create_app
    from tformer.serve.options import ServeOptions

    app = create_app(translator, ServeOptions(max_wait_ms=0), name="tiny")

    def broken(max_batch):
        raise RuntimeError("no kernels today")

    app.state.server.service.engine.warm_up = broken
    with TestClient(app) as client:
        until(lambda: client.get("/health").json()["status"] != "warming up", "past the warm-up")
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert r.json()["error"]["message"] == "the warm-up failed: RuntimeError: no kernels today"
        assert client.post("/v1/translate", json={"text": "deux"}).json() == {
            "translation": translator.translate(["deux"])[0]
        }
    assert "RuntimeError: no kernels today" in capsys.readouterr().err  # with its traceback


def test_a_value_the_library_refuses_after_the_schema_is_a_400(translator):
    from starlette.testclient import TestClient

    from tformer.serve.app import create_app
    from tformer.serve.options import ServeOptions

    app = create_app(translator, ServeOptions(max_wait_ms=0), name="tiny")
    endpoint = app.state.server.service.endpoints["/v1/translate"]

    def refuses(body):
        raise ValueError("top_p must be in (0, 1], got 7")

    object.__setattr__(endpoint, "parse", refuses)  # as if the schema had let a bad value through
    with TestClient(app) as client:
        error(
            client.post("/v1/translate", json={"text": "un"}),
            400,
            None,
            "cannot be decoded: top_p must be in (0, 1]",
        )
