"""From a trained model back to tokens: greedy and beam search with the KV cache; sampling; continuous
batching of many requests (batching, seq2seq_batching); streaming text deltas; reduced precision."""

from tformer.inference.batching import BatchDecoder, GenerationRequest, StepEvent
from tformer.inference.decoding import Hypothesis, beam_search, beam_steps, greedy_decode, length_penalty
from tformer.inference.precision import PRECISIONS, apply_precision
from tformer.inference.sampling import Sampling, filter_logits, generate, generate_steps
from tformer.inference.seq2seq_batching import TranslationDecoder, TranslationRequest
from tformer.inference.streaming import TextStream

__all__ = [
    "PRECISIONS",
    "BatchDecoder",
    "GenerationRequest",
    "Hypothesis",
    "Sampling",
    "StepEvent",
    "TextStream",
    "TranslationDecoder",
    "TranslationRequest",
    "apply_precision",
    "beam_search",
    "beam_steps",
    "filter_logits",
    "generate",
    "generate_steps",
    "greedy_decode",
    "length_penalty",
]
