"""Text to ids: tokenizers, batching, the embedded synthetic task."""

from tformer.data.batching import PairBatch, bucket_batches, make_pair_batch, pad
from tformer.data.tokenizers import SPECIALS, Tokenizer

__all__ = ["SPECIALS", "PairBatch", "Tokenizer", "bucket_batches", "make_pair_batch", "pad"]
