"""POST /v1/classify for text and images against the offline predictors on the same checkpoints, in float32
and bfloat16, one batch of concurrent requests; a vision server's own errors (not base64, not an image)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from support.models import REVIEWS
from support.serving import batches, posted_together, serving
from tformer.tasks import TextClassifier
from tformer.tasks.vision import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = sorted({t for t, _ in REVIEWS})


def png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_texts_equal_the_offline_classifier(checkpoint, precision):
    classifier = TextClassifier.load(checkpoint("classification"), precision=precision)
    alone = [classifier.predict([t])[0] for t in TEXTS]
    probs = classifier.probabilities(TEXTS)
    bodies = [{"text": t} for t in TEXTS]
    replies, server = posted_together(
        classifier, "/v1/classify", bodies, max_batch=len(TEXTS), max_wait_ms=10_000
    )
    assert batches(server) == (1, len(TEXTS))  # one batch
    for r, (label, p), row in zip(replies, alone, probs, strict=True):
        got = r.json()
        assert r.status_code == 200 and got["label"] == label
        assert got["probability"] == pytest.approx(p, abs=1e-6 if precision == "fp32" else 1e-2)
        assert list(got["probabilities"]) == classifier.labels
        assert list(got["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-6)


def test_images_equal_the_offline_classifier(checkpoint, tmp_path):
    classifier = ImageClassifier.load(checkpoint("vision"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(5)]
    files = []
    for i, pixels in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels, "L").save(files[-1])
    offline = classifier.predict_files(files)
    probs = classifier.probabilities(torch.from_numpy(np.stack(images)[:, None]))
    bodies = [{"image": png(p)} for p in images]
    replies, server = posted_together(
        classifier, "/v1/classify", bodies, max_batch=len(images), max_wait_ms=10_000
    )
    assert batches(server) == (1, len(images))
    for r, (_, label, p), row in zip(replies, offline, probs, strict=True):
        got = r.json()
        assert (
            r.status_code == 200
            and got["label"] == label
            and got["probability"] == pytest.approx(p, abs=1e-6)
        )
        assert list(got["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-6)


def test_images_that_are_not_base64_or_not_images_are_refused(checkpoint):
    classifier = ImageClassifier.load(checkpoint("vision"))
    whole = base64.b64decode(png(np.zeros((8, 8), dtype=np.uint8)))
    bad = {
        "not base64!": "image is not base64",
        base64.b64encode(whole[: len(whole) * 2 // 3]).decode(): "image: corrupt or truncated image",
        base64.b64encode(b"plain text").decode(): "image: not an image Pillow can read",
    }
    with serving(classifier, max_wait_ms=0) as client:
        for encoded, message in bad.items():
            r = client.post("/v1/classify", json={"image": encoded})
            assert r.status_code == 400 and r.json()["error"]["field"] == "image", r.text
            assert r.json()["error"]["message"].startswith(message), r.text
        r = client.post("/v1/classify", json={"text": "a text to a vision model"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "text"
        assert (
            "did you mean 'image'" in r.json()["error"]["message"]
            or "valid keys: image" in r.json()["error"]["message"]
        )


def test_the_server_draws_no_progress_bars(checkpoint, monkeypatch):
    """A bar per batch would fill the terminal that runs `tformer serve`."""
    import tformer.tasks.classification as text_task
    import tformer.tasks.vision as vision_task

    drawn = []
    for module in (text_task, vision_task):
        monkeypatch.setattr(module, "progress", lambda it, total, desc: drawn.append(desc) or it)
    classifiers = {
        "text": TextClassifier.load(checkpoint("classification")),
        "image": ImageClassifier.load(checkpoint("vision")),
    }
    bodies = {"text": {"text": TEXTS[0]}, "image": {"image": png(np.zeros((8, 8), dtype=np.uint8))}}
    for kind, classifier in classifiers.items():
        with serving(classifier, max_wait_ms=0) as client:
            assert client.post("/v1/classify", json=bodies[kind]).status_code == 200
    assert drawn == []
    classifiers["text"].predict(TEXTS[:1])  # the command line's path still draws its bar
    assert drawn == ["classifying"]
