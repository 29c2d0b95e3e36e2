"""Text classifier: the paper's encoder, pooled to one vector, then dropout and a linear layer.

Pooling "cls" reads the first position, where the task puts a BOS token (BERT's [CLS]); "mean" averages
the non-padding positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tformer.attention.masks import padding_mask
from tformer.config import ClassifierConfig
from tformer.layers import dropout_layer, init_linears_
from tformer.models.encoder import Encoder


@dataclass
class ClassifierOutput:
    logits: Tensor  # (B, n_classes)
    attention: list[Tensor] | None = None  # per layer (B, H, T, T), when asked for


def pool(x: Tensor, mask: Tensor | None, kind: str) -> Tensor:
    """(B, T, C) encoder states -> (B, C): the first position ("cls"), or the mean over the positions the
    (B, 1, 1, T) key mask keeps ("mean"; sentence-transformers' mean pooling)."""
    if kind == "cls":
        return x[:, 0]
    if mask is None:
        return x.mean(1)
    keep = mask[:, 0, 0, :, None].to(x.dtype)  # (B, T, 1)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class Classifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c, c.vocab_size)
        self.dropout = dropout_layer(c.dropout)
        self.head = nn.Linear(c.d_model, c.n_classes)
        for layer in self.encoder.layers:
            init_linears_(layer, nn.init.xavier_uniform_)

    def forward(
        self, ids: Tensor, *, need_weights: bool = False, token_types: Tensor | None = None
    ) -> ClassifierOutput:
        """ids (B, T), padded with pad_id -> class logits (B, n_classes). `token_types` (B, T): segment ids
        for a model with token type embeddings (None: segment 0)."""
        mask = padding_mask(ids, self.config.pad_id) if ids.dim() == 2 else None  # (B, 1, 1, T)
        out = self.encoder(ids, mask=mask, need_weights=need_weights, token_types=token_types)
        pooled = pool(out.x, mask, self.config.pooling)
        return ClassifierOutput(self.head(self.dropout(pooled)), out.weights)

    @torch.no_grad()
    def probabilities(self, ids: Tensor) -> Tensor:
        return torch.softmax(self.forward(ids).logits.float(), dim=-1)
