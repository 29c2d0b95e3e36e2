"""Activation checkpointing (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost"): a stack
keeps only each Transformer layer's input during the forward pass and recomputes the layer's activations in
the backward pass, trading about one more forward per step for the memory of every layer's intermediates.

`LayerCheckpointing` is mixed into the modules that loop over layers (`TransformerStack`, hence `Encoder`
and `LanguageModel.blocks`; `Decoder`; `VisionTransformer`); `set_activation_checkpointing` switches it on
a built model (the trainer does, from `train.checkpoint_activations`). The flag is a plain attribute, not
state: state-dict keys do not change, and a saved model loads without it.

Recomputation gives the same numbers: `torch.utils.checkpoint` (use_reentrant=False) restores the RNG state
the layer's forward started from (`preserve_rng_state`), so dropout draws the same masks, and the autocast
state it ran under. Only training with gradients recomputes: evaluation, `no_grad` inference and KV-cached
decoding run the layers as they always did. Batch normalisation, whose running statistics a recomputation
would update twice, is in no Transformer layer; the CNN and RNN baselines take no part (no stack has them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerCheckpointing:
    """A module that runs its layers through `run_layer`, recomputed in backward when
    `checkpoint_activations` is set (an instance attribute; False by default)."""

    checkpoint_activations: bool = False

    def run_layer(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """`layer(*args, **kwargs)`, checkpointed when switched on, in training mode, with grad enabled."""
        training = isinstance(self, nn.Module) and self.training
        if self.checkpoint_activations and training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        return layer(*args, **kwargs)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch activation checkpointing on (or off) in every layer stack of `model`; returns how many stacks
    there are (0: nothing to checkpoint, e.g. an RNN or CNN baseline)."""
    stacks = [m for m in model.modules() if isinstance(m, LayerCheckpointing)]
    for m in stacks:
        m.checkpoint_activations = enabled
    return len(stacks)
