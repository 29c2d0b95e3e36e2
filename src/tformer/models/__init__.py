"""Models built from tformer's layers."""

from tformer.models.seq2seq import DecoderCache, Seq2Seq, Seq2SeqOutput

__all__ = ["DecoderCache", "Seq2Seq", "Seq2SeqOutput"]
