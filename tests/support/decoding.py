"""Models for decoding tests whose tokens depend on their context.

At GPT-2's initialisation (weights N(0, 0.02)) an untrained model is nearly context-blind: its logits
barely move with what it attends to, so a batched decoder that attended to the wrong keys (another row's
padding, a missing mask) would still produce the same tokens, and a parity test could not fail. Scaling
every weight matrix by 3 makes each step's distribution depend on the context (checked by mutation: the
batched-generation tests fail without the per-row causal mask).
"""

from __future__ import annotations

import torch

from tformer.tasks import TextGenerator


def context_sensitive(gen: TextGenerator, scale: float = 3.0) -> TextGenerator:
    """`gen` with its model's weight matrices scaled by `scale`, in place."""
    with torch.no_grad():
        for p in gen.model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return gen
