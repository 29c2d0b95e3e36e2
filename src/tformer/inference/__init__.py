"""From a trained model back to tokens: greedy and beam search with the KV cache."""

from tformer.inference.decoding import Hypothesis, beam_search, greedy_decode, length_penalty
from tformer.inference.sampling import filter_logits, generate

__all__ = ["Hypothesis", "beam_search", "filter_logits", "generate", "greedy_decode", "length_penalty"]
