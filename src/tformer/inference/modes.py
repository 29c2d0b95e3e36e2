"""Eval mode for inference without writing to a shared model.

`Module.eval()` and `Module.train()` write a flag on every module of the model: two threads that switch a
shared model's mode around their calls race (one thread's "restore training mode" lands in the middle of
the other's decoding, with dropout on). So a predictor (tformer.tasks) puts its model in eval mode once, when
it is made, and the inference functions (generate, greedy_decode, beam_search, class_probabilities and the
attention maps) leave a model in eval mode alone: any number of threads may run them on it at once.

Given a model with any module in training mode they still run it in eval mode (no dropout) and put each
module's own flag back after. That writes to the model, so it is not safe while another thread uses the same
model (nor is using a model from another thread while it trains).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from torch import nn


class Switchable(Protocol):
    """A model as `evaluating` uses it: an nn.Module, or a protocol of one (inference/decoding.py)."""

    def modules(self) -> Iterator[nn.Module]: ...

    def eval(self) -> object: ...


@contextmanager
def evaluating(model: Switchable) -> Iterator[None]:
    """Inside the block the model is in eval mode. Without a module in training mode: nothing is written.
    Otherwise eval mode, then each module's own flag restored (`model.train(True)` would switch on a
    submodule that was deliberately left in eval mode)."""
    training = [m for m in model.modules() if m.training]
    if not training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True
