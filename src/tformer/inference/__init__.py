"""From a trained model back to tokens: greedy and beam search with the KV cache; reduced precision."""

from tformer.inference.decoding import Hypothesis, beam_search, greedy_decode, length_penalty
from tformer.inference.precision import PRECISIONS, apply_precision
from tformer.inference.sampling import filter_logits, generate

__all__ = [
    "PRECISIONS",
    "Hypothesis",
    "apply_precision",
    "beam_search",
    "filter_logits",
    "generate",
    "greedy_decode",
    "length_penalty",
]
