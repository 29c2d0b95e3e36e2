"""Convolutional text classifier (Kim, 2014): embeddings, 1-D convolutions of several widths, ReLU,
max-over-time pooling, dropout, linear head. The `Classifier` interface, so the classification task,
trainer and predictor are shared with the Transformer.

Kim's sizes: widths 3, 4, 5 with 100 filters each, dropout 0.5 (`cnn_widths`, `cnn_filters`, `dropout`);
d_model is the embedding size. Padding positions never win the max: their activations are set to -inf
before pooling; every window that starts on a real token counts (padded on the right with zero
embeddings), so a text shorter than a filter still has one and extra batch padding changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ClassifierConfig
from tformer.models.classifier import ClassifierOutput
from tformer.models.stack import check_ids


class CNNClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.architecture != "cnn":
            raise ValueError(f"CNNClassifier needs architecture 'cnn', got {c.architecture!r}")
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(c.d_model, c.cnn_filters, w) for w in c.cnn_widths)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.cnn_filters * len(c.cnn_widths), c.n_classes)

    def forward(self, ids: Tensor, *, need_weights: bool = False) -> ClassifierOutput:
        """ids (B, T), padded with pad_id -> class logits (B, n_classes). No attention weights to return."""
        c = self.config
        check_ids(ids, vocab_size=c.vocab_size, max_len=c.max_seq_len, name="ids")
        real = ids != c.pad_id  # (B, T)
        # Pad every text with width - 1 padding tokens (zero embeddings) on the right, so each window that
        # starts on a real token exists whatever the batch's padding; windows starting on padding are
        # masked out of the max.
        ids = F.pad(ids, (0, max(c.cnn_widths) - 1), value=c.pad_id)
        x = self.embed(ids).transpose(1, 2)  # (B, C, T + widest - 1)
        t = real.shape[1]
        pooled = []
        for conv in self.convs:
            h = torch.relu(conv(x))[..., :t]  # (B, F, T): window starting at each position
            h = h.masked_fill(~real[:, None, :], float("-inf"))
            pooled.append(h.amax(dim=-1).clamp(min=0.0))  # an all-padding row pools to 0, not -inf
        return ClassifierOutput(self.head(self.dropout(torch.cat(pooled, dim=-1))))

    @torch.no_grad()
    def probabilities(self, ids: Tensor) -> Tensor:
        return torch.softmax(self.forward(ids).logits.float(), dim=-1)
