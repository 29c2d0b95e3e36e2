"""Greedy and beam search: beam 1 == greedy, beam never worse than greedy on a trained model, EOS, batching."""

import pytest
import torch

from tformer.config import ModelConfig, TrainConfig
from tformer.data.tokenizers import Tokenizer
from tformer.inference import beam_search, greedy_decode
from tformer.models import Seq2Seq
from tformer.tasks import TranslationTask
from tformer.training import Trainer

BOS, EOS = 1, 2


def _random_model(seed=0):
    torch.manual_seed(seed)
    c = ModelConfig(
        src_vocab_size=30,
        tgt_vocab_size=25,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_layers=2,
        dropout=0.0,
        max_seq_len=40,
    )
    return Seq2Seq(c).eval()


def _teacher_forced_score(model, src_row, tokens, finished):
    tgt = torch.tensor([[BOS, *tokens]])
    with torch.no_grad():
        logp = torch.log_softmax(model(src_row[None], tgt).logits[0].double(), -1)
        logp[:, [0, BOS]] = float("-inf")  # decoding never emits PAD or BOS
    targets = [*tokens, EOS] if finished else tokens
    return sum(logp[i, t].item() for i, t in enumerate(targets))


def test_beam_one_equals_greedy():
    model = _random_model()
    src = torch.randint(4, 30, (6, 9))
    src[3, 5:] = 0
    greedy = greedy_decode(model, src, bos_id=BOS, eos_id=EOS, max_len=12)
    beam = beam_search(model, src, bos_id=BOS, eos_id=EOS, beam_size=1, length_penalty_alpha=0.0, max_len=12)
    for g, b in zip(greedy, beam, strict=True):
        assert b[0].tokens == g.tokens
        assert b[0].score == pytest.approx(g.score, abs=1e-6)


def test_scores_are_teacher_forced_log_probabilities():
    model = _random_model(1)
    src = torch.randint(4, 30, (3, 7))
    hyps = beam_search(
        model, src, bos_id=BOS, eos_id=EOS, beam_size=3, length_penalty_alpha=0.0, max_len=10, n_best=3
    )
    for row, nbest in zip(src, hyps, strict=True):
        assert len(nbest) == 3
        scores = [h.score for h in nbest]
        assert scores == sorted(scores, reverse=True)
        for h in nbest:
            assert EOS not in h.tokens and BOS not in h.tokens
            assert h.score == pytest.approx(_teacher_forced_score(model, row, h.tokens, h.finished), abs=1e-4)


def test_batched_beam_equals_one_by_one():
    model = _random_model(2)
    src = torch.randint(4, 30, (4, 8))
    src[1, 4:] = 0
    src[2, 6:] = 0
    batched = beam_search(model, src, bos_id=BOS, eos_id=EOS, beam_size=4, max_len=15)
    for i in range(4):
        length = int((src[i] != 0).sum())
        single = beam_search(model, src[i : i + 1, :length], bos_id=BOS, eos_id=EOS, beam_size=4, max_len=15)
        assert single[0][0].tokens == batched[i][0].tokens
        assert single[0][0].score == pytest.approx(batched[i][0].score, abs=1e-5)


def test_max_len_cuts_unfinished_hypotheses():
    model = _random_model(3)
    src = torch.randint(4, 30, (2, 5))
    for h in greedy_decode(model, src, bos_id=BOS, eos_id=EOS, max_len=3):
        assert len(h.tokens) <= 3 and (h.finished or len(h.tokens) == 3)
    hyps = beam_search(model, src, bos_id=BOS, eos_id=EOS, beam_size=2, max_len=2)
    for nbest in hyps:
        assert len(nbest[0].tokens) <= 2
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        beam_search(model, src, bos_id=BOS, eos_id=EOS, beam_size=0)


@pytest.fixture(scope="module")
def trained_reverser():
    """A tiny model trained for a few seconds to reverse digit strings."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def sample(n):
        pairs = []
        for _ in range(n):
            k = int(torch.randint(2, 7, (1,), generator=g))
            seq = [words[int(i)] for i in torch.randint(0, 10, (k,), generator=g)]
            pairs.append((" ".join(seq), " ".join(reversed(seq))))
        return pairs

    train, valid = sample(3000), sample(100)
    tok = Tokenizer.train([s for s, _ in train], kind="word")
    mc = ModelConfig(
        src_vocab_size=tok.vocab_size,
        tgt_vocab_size=tok.vocab_size,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_layers=2,
        dropout=0.0,
        max_seq_len=16,
    )
    tc = TrainConfig(
        epochs=8, batch_tokens=800, lr=3e-3, warmup_steps=50, log_every=1000, label_smoothing=0.0
    )
    task = TranslationTask(mc, tc, tok, tok, train, valid, eval_max_sentences=20)
    model = Seq2Seq(mc)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Trainer(model, task, tc, out_dir=d, progress=False).fit()
    return model.eval(), tok, valid


def test_beam_never_scores_below_greedy_on_trained_model(trained_reverser):
    model, tok, valid = trained_reverser
    src = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(tok.encode(s)) for s, _ in valid[:60]], batch_first=True
    )
    greedy = greedy_decode(model, src, bos_id=tok.bos_id, eos_id=tok.eos_id, max_len=12)
    beam = beam_search(
        model, src, bos_id=tok.bos_id, eos_id=tok.eos_id, beam_size=4, length_penalty_alpha=0.0, max_len=12
    )
    better = 0
    for g, b in zip(greedy, beam, strict=True):
        assert b[0].score >= g.score - 1e-9
        better += b[0].score > g.score + 1e-9
    # The model learned something: most greedy outputs are correct reversals.
    correct = sum(tok.decode(h.tokens) == t for h, (_, t) in zip(greedy, valid[:60], strict=True))
    assert correct >= 30, correct
