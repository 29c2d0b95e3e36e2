"""POST /v1/classify for both classifier families: a text classifier takes `{"text": ...}`, a vision one
`{"image": BASE64}` (the bytes of a PNG, JPEG, ... file); both answer `{"label": ..., "probability": p,
"probabilities": {label: p, ...}}`. The requests waiting together go through one batched call
(`class_probabilities`, or `ImageClassifier.probabilities`)."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from tformer.data.images import load_image
from tformer.data.readers import DataError
from tformer.serve.batching import BatchAtATime, Job
from tformer.serve.errors import RequestError
from tformer.serve.schema import Body
from tformer.serve.service import Endpoint, Parsed, Service
from tformer.tasks.classification import TextClassifier, class_probabilities
from tformer.tasks.vision import ImageClassifier


def labelled(probabilities: torch.Tensor, labels: Sequence[str]) -> list[dict[str, object]]:
    """(N, n_classes) -> each row's best label, its probability and every label's."""
    best = probabilities.argmax(-1).tolist()
    return [
        {
            "label": labels[i],
            "probability": float(row[i]),
            "probabilities": dict(zip(labels, map(float, row), strict=True)),
        }
        for i, row in zip(best, probabilities, strict=True)
    ]


class TextEngine(BatchAtATime):
    def __init__(self, classifier: TextClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def run(self, key: Hashable, jobs: list[Job]) -> list[dict[str, object]]:
        probs = class_probabilities(self.classifier.model, [j.request for j in jobs], show_progress=False)
        return labelled(probs, self.classifier.labels)

    def warm_up(self, max_batch: int) -> None:
        c, tok = self.classifier.model.config, self.classifier.tok
        row = [tok.bos_id, *(4 + i % max(1, tok.vocab_size - 4) for i in range(min(8, c.max_seq_len) - 1))]
        for n in sorted({1, 2, max_batch}):
            class_probabilities(self.classifier.model, [row] * n, show_progress=False)


class ImageEngine(BatchAtATime):
    def __init__(self, classifier: ImageClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def run(self, key: Hashable, jobs: list[Job]) -> list[dict[str, object]]:
        images = torch.from_numpy(np.stack([j.request for j in jobs]))
        return labelled(self.classifier.probabilities(images, show_progress=False), self.classifier.classes)

    def warm_up(self, max_batch: int) -> None:
        c = self.classifier.model.config
        for n in sorted({1, 2, max_batch}):
            self.classifier.probabilities(
                torch.zeros(n, c.channels, c.image_size, c.image_size, dtype=torch.uint8), show_progress=False
            )


def text_service(classifier: TextClassifier, name: str) -> Service:
    limit, tok = classifier.model.config.max_seq_len, classifier.tok

    def parse(body: Body) -> Parsed:
        text = body.text("text", what="the text to classify")
        if not text.strip():
            raise RequestError("text is empty; expected a text to classify", field="text")
        row = [tok.bos_id, *tok.encode(text)]  # as the offline predictor encodes it (encode_texts)
        if len(row) > limit:
            raise RequestError(
                f"text has {len(row)} tokens with BOS, more than the model's max_seq_len = {limit}; "
                "expected a shorter text",
                field="text",
            )
        return Parsed("text", row)

    endpoint = Endpoint(("text",), parse, reply=lambda result, answer: result)
    return Service("classification", name, TextEngine(classifier), {"/v1/classify": endpoint})


def image_service(classifier: ImageClassifier, name: str) -> Service:
    c = classifier.model.config

    def parse(body: Body) -> Parsed:
        encoded = body.text("image", what="the base64 bytes of an image file (PNG, JPEG, ...)")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(
                "image is not base64; expected the base64 bytes of an image file (PNG, JPEG, ...)",
                field="image",
            ) from None
        try:
            pixels = load_image(
                io.BytesIO(raw),
                channels=c.channels,
                size=c.image_size,
                resize=classifier.resize,
                name="image",
            )
        except DataError as exc:
            raise RequestError(str(exc), field="image") from None
        return Parsed("image", pixels)

    endpoint = Endpoint(("image",), parse, reply=lambda result, answer: result, offload=True)
    return Service("vision", name, ImageEngine(classifier), {"/v1/classify": endpoint})
