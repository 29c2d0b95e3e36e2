"""From a trained model back to tokens: greedy and beam search with the KV cache."""

from tformer.inference.decoding import Hypothesis, beam_search, greedy_decode, length_penalty

__all__ = ["Hypothesis", "beam_search", "greedy_decode", "length_penalty"]
