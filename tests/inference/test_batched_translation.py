"""Batched translation equals one source at a time: each row stops at its own step limit (the default
2 S + 10 from its own unpadded length, or one max_len per row), so padding a short source next to a long one
changes nothing: identical tokens, and scores (float64 sums of log-probabilities of float32 logits that a
padded batch computes in another summation order, ~1e-7 relative each) equal to 1e-5, the issue's bound."""

import pytest
import torch

from tformer.config import ModelConfig
from tformer.inference import beam_search, greedy_decode
from tformer.models import Seq2Seq

BOS, EOS = 1, 2


def _model(seed=0):
    torch.manual_seed(seed)
    c = ModelConfig(
        src_vocab_size=30, tgt_vocab_size=25, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0,
        max_seq_len=40,
    )  # fmt: skip
    return Seq2Seq(c).eval()


def _sources(seed=0):
    """Rows of lengths 3, 7, 12 and 5, right-padded: the untrained model rarely emits EOS, so most
    hypotheses run to their row's limit (2 S + 10), where batching used to take the padded length."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 7, 12, 5]
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, 30, (n,), generator=g)
    return src, lengths


@pytest.mark.parametrize("max_len", [None, [4, 9, 2, 30], [None, 5, None, 3]])
def test_greedy_batched_equals_alone(max_len):
    model, (src, lengths) = _model(), _sources()
    batched = greedy_decode(model, src, bos_id=BOS, eos_id=EOS, max_len=max_len)
    for i, n in enumerate(lengths):
        own = None if max_len is None else max_len[i]
        alone = greedy_decode(model, src[i : i + 1, :n], bos_id=BOS, eos_id=EOS, max_len=own)[0]
        assert batched[i].tokens == alone.tokens
        assert batched[i].finished == alone.finished
        assert batched[i].score == pytest.approx(alone.score, abs=1e-5)
        limit = 2 * n + 10 if own is None else own
        assert len(alone.tokens) <= limit and (alone.finished or len(alone.tokens) == limit)


@pytest.mark.parametrize("max_len", [None, [4, 9, 2, 30], [None, 5, None, 3]])
def test_beam_batched_equals_alone(max_len):
    model, (src, lengths) = _model(1), _sources(1)
    batched = beam_search(model, src, bos_id=BOS, eos_id=EOS, beam_size=3, max_len=max_len, n_best=2)
    for i, n in enumerate(lengths):
        own = None if max_len is None else max_len[i]
        alone = beam_search(
            model, src[i : i + 1, :n], bos_id=BOS, eos_id=EOS, beam_size=3, max_len=own, n_best=2
        )
        for b, a in zip(batched[i], alone[0], strict=True):
            assert (b.tokens, b.finished) == (a.tokens, a.finished)
            assert b.score == pytest.approx(a.score, abs=1e-5)


def test_max_len_per_row_is_checked():
    model, (src, _) = _model(), _sources()
    with pytest.raises(ValueError, match="max_len has 2 entries; expected one per source"):
        greedy_decode(model, src, bos_id=BOS, eos_id=EOS, max_len=[3, 4])
    with pytest.raises(ValueError, match="max_len must be an int >= 1"):
        beam_search(model, src, bos_id=BOS, eos_id=EOS, max_len=[3, 0, 4, 5])


def test_translator_batches_like_one_at_a_time():
    from support.models import FRENCH, translator

    t = translator(3)
    texts = [FRENCH[2], FRENCH[0], "le chat", FRENCH[1]]
    for beam in (1, 3):
        together = t.translate(texts, beam_size=beam)
        assert together == [t.translate([x], beam_size=beam)[0] for x in texts]
    limits = [2, 5, 1, 7]
    assert t.translate(texts, beam_size=1, max_len=limits) == [
        t.translate([x], beam_size=1, max_len=n)[0] for x, n in zip(texts, limits, strict=True)
    ]


def test_translation_decoder_joins_and_leaves_like_greedy_alone():
    """Continuous batching of greedy translation: sources join between steps (more than the free rows),
    one is cancelled; every other text equals `translate([text], beam_size=1)`, its score greedy_decode's."""
    from support.models import FRENCH, translator
    from tformer.inference.seq2seq_batching import TranslationRequest

    t = translator(5)
    # the first two are short: the longer sources that join widen the running rows' cross-attention keys
    texts = ["le chat", FRENCH[2], FRENCH[0], FRENCH[1], "un chien blanc", "la maison"]
    limits = [3, None, None, 6, None, None]
    dec = t.batch_decoder(max_batch=3)
    got: dict[int, str] = {}
    scores: dict[int, float] = {}
    index = {dec.add(TranslationRequest(texts[i], limits[i])): i for i in (0, 1)}

    def run():
        for e in dec.step():
            got[e.handle] = got.get(e.handle, "") + e.text
            if e.finished:
                scores[e.handle] = e.score

    run()
    for i in (2, 3, 4, 5):
        index[dec.add(TranslationRequest(texts[i], limits[i]))] = i
    run()
    run()
    victim = next(h for h, i in index.items() if i == 3)
    assert dec.cancel(victim) and not dec.cancel(victim)
    while len(dec):
        run()
    for h, i in index.items():
        if h == victim:
            continue
        assert got[h] == t.translate([texts[i]], beam_size=1, max_len=limits[i])[0]
        src = torch.tensor([t.encode([texts[i]])[0]])
        ref = greedy_decode(t.model, src, bos_id=t.tgt_tok.bos_id, eos_id=t.tgt_tok.eos_id, max_len=limits[i])
        assert scores[h] == pytest.approx(ref[0].score, abs=1e-5)
    assert victim not in scores


def test_translation_requests_are_checked():
    from support.models import translator
    from tformer.inference.seq2seq_batching import TranslationRequest

    dec = translator().batch_decoder()
    with pytest.raises(ValueError, match="text is empty"):
        dec.add(TranslationRequest("   "))
    with pytest.raises(ValueError, match="more than the model's max_seq_len = 24"):
        dec.add(TranslationRequest("le chat " * 20))
    with pytest.raises(ValueError, match="max_len must be an int >= 1 or None"):
        TranslationRequest("le chat", 0)


@pytest.mark.parametrize("beam", [1, 3])
def test_translate_stream_joins_to_translate(beam):
    from support.models import FRENCH, translator

    t = translator(6)
    for text in [*FRENCH, "le chat"]:
        assert "".join(t.translate_stream(text, beam_size=beam)) == t.translate([text], beam_size=beam)[0]


def test_beam_stream_of_several_sources_never_takes_back_a_word():
    """Beam search over four sources at once, streamed: each step's text of a source is a prefix of its
    final translation, and the final texts and scores are beam search's."""
    from support.models import FRENCH, translator

    t = translator(7)
    texts = [FRENCH[1], "le chat", FRENCH[0], FRENCH[2]]
    want = t.translate(texts, beam_size=3)
    got = ["", "", "", ""]
    finals = {}
    for events in t.beam_stream(texts, beam_size=3):
        for e in events:
            got[e.handle] += e.text
            assert want[e.handle].startswith(got[e.handle])
            if e.finished:
                finals[e.handle] = e.score
    assert got == want and sorted(finals) == [0, 1, 2, 3]
    src = torch.tensor([t.encode([texts[2]])[0]])
    ref = beam_search(t.model, src, bos_id=t.tgt_tok.bos_id, eos_id=t.tgt_tok.eos_id, beam_size=3)
    assert finals[2] == pytest.approx(ref[0][0].score, abs=1e-5)


def test_cli_translate_stream_prints_the_same(tmp_path, capsys):
    from support.models import FRENCH, save_translator, translator
    from tformer.cli import main

    ckpt = str(save_translator(translator(8), tmp_path / "tr"))
    for beam in ("1", "3"):
        argv = ["translate", ckpt, *FRENCH, "--beam", beam]
        assert main(argv) == 0
        plain = capsys.readouterr().out
        assert main([*argv, "--stream"]) == 0
        assert capsys.readouterr().out == plain


def test_sampled_translation_batched_equals_alone():
    """Sampling (temperature, top-k / top-p, a seed per source) gives each source the tokens it samples
    alone: in one padded greedy_decode, and joining the continuous TranslationDecoder mid-way."""
    from support.models import FRENCH, translator
    from tformer.inference import Sampling
    from tformer.inference.seq2seq_batching import TranslationRequest

    model, (src, lengths) = _model(2), _sources(2)
    draws = [Sampling(seed=1), None, Sampling(temperature=0.7, top_k=5, seed=2), Sampling(top_p=0.9, seed=3)]
    batched = greedy_decode(model, src, bos_id=BOS, eos_id=EOS, sampling=draws)
    for i, n in enumerate(lengths):
        alone = greedy_decode(model, src[i : i + 1, :n], bos_id=BOS, eos_id=EOS, sampling=draws[i])[0]
        assert (batched[i].tokens, batched[i].finished) == (alone.tokens, alone.finished)
        assert batched[i].score == pytest.approx(alone.score, abs=1e-5)
    assert batched[0].tokens != greedy_decode(model, src[:1, :3], bos_id=BOS, eos_id=EOS)[0].tokens

    t = translator(9)
    texts = [FRENCH[0], "le chat", FRENCH[2], FRENCH[1]]
    dec = t.batch_decoder(max_batch=4)
    got: dict[int, str] = {}
    handles = {dec.add(TranslationRequest(texts[0], sampling=draws[0])): 0}
    for e in dec.step():
        got[e.handle] = got.get(e.handle, "") + e.text
    for i in (1, 2, 3):
        handles[dec.add(TranslationRequest(texts[i], sampling=draws[i]))] = i
    while len(dec):
        for e in dec.step():
            got[e.handle] = got.get(e.handle, "") + e.text
    for h, i in handles.items():
        assert got[h] == t.translate([texts[i]], beam_size=1, sampling=draws[i])[0]
    assert t.translate(texts, beam_size=1, sampling=draws) == [got[h] for h in handles]
    with pytest.raises(ValueError, match="sampling decodes one hypothesis: it needs beam_size = 1"):
        t.translate(texts, beam_size=2, sampling=draws[0])
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        Sampling(temperature=0)
    with pytest.raises(ValueError, match="sampling has 1 entries; expected one per source"):
        greedy_decode(model, src, bos_id=BOS, eos_id=EOS, sampling=[draws[0]])
