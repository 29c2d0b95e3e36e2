"""Text deltas of a generation that join to exactly its final text.

A generation's text is its whole token sequence decoded (`TextGenerator` decodes prompt and continuation
together), and that text is not always a prefix of the next step's: a multi-byte character split over
byte-level tokens decodes to U+FFFD until its last byte arrives, and the text before a stop string is all
that is returned. So `TextStream` emits a new suffix only once it is stable:

- trailing U+FFFD (an incomplete UTF-8 sequence) is held back until the next token decides it;
- a suffix that is the start of a stop string is held back until the text either completes the stop
  string (the generation ends, cut before it) or goes on differently;
- a stop string anywhere in the text ends it: the text before its first occurrence is final.

The decoders of tformer's tokenizers (Metaspace, Fuse, byte-level) only ever extend their text past those
trailing replacement characters, so each delta is final: "".join(deltas) == the non-streamed text
(tests/inference/test_streaming.py checks it over token and stop-string sequences).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` before the first occurrence of any stop string, or None when none occurs."""
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else None


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of `text` could still become (the start of) a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class Decoder(Protocol):
    """What turns ids into text (tformer's Tokenizer)."""

    def decode(self, ids: list[int]) -> str: ...


class Continuation:
    """The text a generation adds to its prompt: prompt and continuation decoded together, so a space at
    the boundary survives (word and BPE decoders drop the leading space of a lone first token), minus the
    prompt's own text (the continuation alone where the joint text does not start with it)."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int]) -> None:
        self.tok, self.n_prompt = tokenizer, len(prompt_ids)
        self.prompt_text = tokenizer.decode(prompt_ids)

    def __call__(self, seq: list[int]) -> str:
        full = self.tok.decode(seq)
        if full.startswith(self.prompt_text):
            return full[len(self.prompt_text) :]
        return self.tok.decode(seq[self.n_prompt :])


class TextStream:
    """Turns the successive full texts of one generation into deltas (see the module docstring).

    `update(text)` after each token with the text so far -> (the new stable delta, whether a stop string
    ended the text); `finish(text)` at the end (EOS, max_new_tokens) -> the rest. The deltas joined equal
    the final text, cut before its first stop string."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a sequence of strings, got {stop!r}")
        self.stop = tuple(stop)
        self.emitted = 0  # characters of the final text given out so far

    def _emit(self, upto: str) -> str:
        if len(upto) <= self.emitted:
            return ""
        delta = upto[self.emitted :]
        self.emitted = len(upto)
        return delta

    def update(self, text: str) -> tuple[str, bool]:
        final = cut_at_stop(text, self.stop)
        if final is not None:
            return self._emit(final), True
        stable = text.rstrip(REPLACEMENT)
        return self._emit(stable[: len(stable) - held_back(stable, self.stop)]), False

    def finish(self, text: str) -> str:
        final = cut_at_stop(text, self.stop)
        return self._emit(text if final is None else final)


__all__ = ["Continuation", "TextStream", "cut_at_stop", "held_back"]
