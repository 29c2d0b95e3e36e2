"""Streaming: the text deltas join to exactly the non-streamed text.

`TextStream` against its reference (the generation loop's own rule: stop at the first step whose text
contains a stop string, cut before its first occurrence), over byte-level token sequences of multi-byte
characters (each prefix decoded as a byte-level decoder does, an incomplete character as U+FFFD) and stop
strings (hypothesis); then `TextGenerator.generate(stream=True)` against `generate()` for greedy, seeded
sampling and stop strings on char and BPE tokenizers, the batch decoder's deltas, and `tformer generate
--stream`."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from support.decoding import context_sensitive
from support.models import ENGLISH, generator
from tformer.config import LMConfig
from tformer.data.tokenizers import Tokenizer
from tformer.inference.batching import GenerationRequest
from tformer.inference.streaming import TextStream, cut_at_stop, held_back
from tformer.models import LanguageModel
from tformer.tasks import TextGenerator

ALPHABET = "ab é€\n😀"


def reference(texts, stop):
    """What generation returns: the text of the first step containing a stop string, cut there, else the
    last text."""
    for text in texts:
        cut = cut_at_stop(text, stop)
        if cut is not None:
            return cut
    return texts[-1] if texts else ""


def streamed(texts, stop):
    stream, out = TextStream(stop), []
    for text in texts:
        delta, stopped = stream.update(text)
        out.append(delta)
        if stopped:
            return out
    out.append(stream.finish(texts[-1] if texts else ""))
    return out


@given(
    text=st.text(alphabet=ALPHABET, max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=4), max_size=40),
    stop=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=3), max_size=3),
)
def test_deltas_join_to_the_final_text(text, cuts, stop):
    data = text.encode("utf-8")
    ends, at = [], 0
    for c in cuts:  # tokens of 1-4 bytes: multi-byte characters split across tokens
        at = min(len(data), at + c)
        ends.append(at)
    ends.append(len(data))
    texts = [data[:e].decode("utf-8", errors="replace") for e in ends]
    deltas = streamed(texts, stop)
    want = reference(texts, stop)
    assert "".join(deltas) == want
    emitted = ""
    for d in deltas:  # never a character that is taken back: each prefix is final
        emitted += d
        assert want.startswith(emitted)


def test_stop_string_starts_are_held_back():
    stream = TextStream(["STOP"])
    assert stream.update("hello S") == ("hello ", False)
    assert stream.update("hello ST") == ("", False)
    assert stream.update("hello STx") == ("STx", False)  # not a stop string after all
    assert stream.update("hello STxSTO") == ("", False)
    assert stream.update("hello STxSTOP and more") == ("", True)
    assert held_back("abcST", ["STOP", "CS"]) == 2
    assert held_back("abc", []) == 0


def test_incomplete_characters_are_held_back():
    stream = TextStream()
    assert stream.update("caf\ufffd") == ("caf", False)
    assert stream.update("café") == ("é", False)
    assert stream.finish("café\ufffd") == "\ufffd"  # at the end it is the text itself


def _bpe_generator(seed=0):
    torch.manual_seed(seed)
    tok = Tokenizer.train(ENGLISH * 4, kind="bpe", vocab_size=60)
    config = LMConfig(
        vocab_size=tok.vocab_size, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0, max_seq_len=24
    )
    return context_sensitive(TextGenerator(LanguageModel(config).eval(), tok))


CALLS = [
    {"greedy": True, "max_new_tokens": 12},
    {"seed": 3, "max_new_tokens": 15, "temperature": 0.8},
    {"seed": 5, "max_new_tokens": 20, "top_p": 0.9, "stop": ["e", "th"]},
    {"greedy": True, "max_new_tokens": 30, "stop": ["a "]},
    {"seed": 1, "max_new_tokens": 0},
]


@pytest.mark.parametrize("make", [generator, _bpe_generator], ids=["char", "bpe"])
@pytest.mark.parametrize("kw", CALLS)
def test_generate_stream_equals_generate(make, kw):
    gen = make(2)
    for prompt in ("the", ""):
        text = gen.generate(prompt, **kw)
        deltas = list(gen.generate(prompt, stream=True, **kw))
        assert "".join(deltas) == text
        assert all(deltas)  # no empty deltas are yielded


def test_batch_decoder_deltas_equal_generate():
    gen = _bpe_generator(3)
    requests = [
        GenerationRequest("the", stop=tuple(kw.pop("stop", ())), **kw) for kw in [dict(c) for c in CALLS]
    ]
    assert gen.generate_batch(requests) == [
        gen.generate(
            r.prompt,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            greedy=r.greedy,
            seed=r.seed,
            stop=r.stop,
        )  # fmt: skip
        for r in requests
    ]


def test_cli_generate_stream_prints_the_same_text(tmp_path, capsys):
    from tformer.cli import main
    from tformer.training.checkpoint import save_checkpoint

    gen = generator(1)
    config = {"task": "lm", "model": gen.model.config.to_dict()}
    ckpt = save_checkpoint(
        tmp_path / "lm",
        model=gen.model,
        config=config,
        write_extra=lambda d: gen.tok.save(d / "tokenizer.json"),
    )
    for extra in (["--greedy", "--stop", "e"], ["--seed", "4", "--top-k", "5"]):
        argv = ["generate", str(ckpt), "--prompt", "the", "--max-new-tokens", "15", *extra]
        assert main(argv) == 0
        plain = capsys.readouterr().out
        assert main([*argv, "--stream"]) == 0
        assert capsys.readouterr().out == plain


def test_rnn_baseline_streams_too():
    """The recurrent LM baseline has no per-row KV cache (no batch decoder) but streams like the Transformer."""
    from tformer.models.rnn import RNNLanguageModel

    base = generator(0)
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=base.tok.vocab_size, d_model=16, n_layers=1, architecture="lstm", max_seq_len=24
    )
    gen = TextGenerator(RNNLanguageModel(config).eval(), base.tok)
    for kw in ({"greedy": True, "max_new_tokens": 30}, {"seed": 2, "max_new_tokens": 30, "stop": ["e"]}):
        assert "".join(gen.generate("the", stream=True, **kw)) == gen.generate("the", **kw)
