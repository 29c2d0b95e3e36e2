"""Classifier and language model: tiny overfits, generation with and without the cache, sampling filters,
rotary positions, tokenizers."""

import pytest
import torch

from support.models import TEXTS
from tformer.config import ClassifierConfig, LMConfig, TrainConfig
from tformer.data.tokenizers import Tokenizer
from tformer.inference.sampling import filter_logits, generate
from tformer.models import Classifier, LanguageModel
from tformer.positions import RotaryEmbedding
from tformer.tasks import ClassificationTask, LanguageModelTask
from tformer.training import Trainer


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_overfits_a_tiny_set(tmp_path, pooling):
    torch.manual_seed(0)
    tok = Tokenizer.train([t for t, _ in TEXTS], kind="word")
    mc = ClassifierConfig(
        vocab_size=tok.vocab_size,
        n_classes=2,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_layers=2,
        dropout=0.0,
        pooling=pooling,
        max_seq_len=16,
    )
    tc = TrainConfig(epochs=60, batch_tokens=1000, lr=3e-3, warmup_steps=5, label_smoothing=0.0, log_every=10)
    task = ClassificationTask(mc, tc, tok, ["neg", "pos"], TEXTS, TEXTS)
    model = Classifier(mc)
    history = Trainer(model, task, tc, out_dir=tmp_path, progress=False).fit()
    final = [r for r in history if r["type"] == "eval"][-1]
    assert final["accuracy"] == 1.0 and final["macro_f1"] == 1.0
    assert final["valid_nll"] < 0.05


def test_lm_overfits_a_tiny_text(tmp_path):
    torch.manual_seed(0)
    text = "to be or not to be, that is the question. " * 20
    tok = Tokenizer.train([text], kind="char")
    mc = LMConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=64)
    tc = TrainConfig(
        epochs=1000,
        max_steps=200,
        batch_size=8,
        lr=1e-2,
        warmup_steps=10,
        log_every=50,
        eval_every_epochs=1000,
    )
    task = LanguageModelTask(mc, tc, tok, text, text)
    model = LanguageModel(mc)
    history = Trainer(model, task, tc, out_dir=tmp_path, progress=False).fit()
    final = [r for r in history if r["type"] == "eval"][-1]
    assert final["valid_nll"] < 0.25, (
        final
    )  # periodic text: only the first characters of a window are uncertain
    out = generate(model, torch.tensor([tok.encode("to be or not")]), max_new_tokens=20, greedy=True)
    assert tok.decode(out[0].tolist()) == "to be or not to be, that is the "


def _lm(positions="learned", max_seq_len=64):
    torch.manual_seed(0)
    return (
        LanguageModel(
            LMConfig(
                vocab_size=50,
                d_model=32,
                n_heads=4,
                d_ff=64,
                n_layers=2,
                max_seq_len=max_seq_len,
                positions=positions,
            )
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("positions", ["learned", "rotary", "sinusoidal"])
@pytest.mark.parametrize(
    "kw", [dict(greedy=True), dict(seed=3, temperature=0.8, top_k=10, top_p=0.9), dict(seed=5)]
)
def test_generation_with_cache_equals_without(positions, kw):
    model = _lm(positions)
    prompt = torch.randint(4, 50, (2, 6))
    a = generate(model, prompt, max_new_tokens=40, use_cache=True, **kw)
    b = generate(model, prompt, max_new_tokens=40, use_cache=False, **kw)
    assert a.shape == (2, 46)
    assert torch.equal(a, b)


def test_cached_logits_equal_full_pass():
    model = _lm("rotary")
    ids = torch.randint(4, 50, (3, 20))
    full = model(ids).logits
    first = model(ids[:, :7], use_cache=True)
    rest = model(ids[:, 7:], cache=first.cache)
    assert rest.cache.length == 20
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-10, rtol=0)


def test_generation_beyond_max_seq_len_keeps_going():
    model = _lm(max_seq_len=16)
    out = generate(model, torch.randint(4, 50, (1, 5)), max_new_tokens=40, seed=1)
    assert out.shape == (1, 45)


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_logits(logits, top_p=0.7).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(logits, top_p=0.75).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(logits, top_p=0.76).isfinite().tolist() == [[True, True, True, False]]
    assert filter_logits(logits, top_p=0.1).isfinite().tolist() == [[True, False, False, False]]
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        filter_logits(logits, temperature=0)
    # A fixed seed gives the same samples; the empirical distribution follows the probabilities.
    probs = torch.softmax(filter_logits(logits.expand(20000, 4)), -1)
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(probs, 1, generator=g)[:, 0]
    freq = torch.bincount(draws, minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.25, 0.15, 0.1]), atol=0.015, rtol=0)


def test_rotary_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(8, 64).double()
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    s1 = (rope(q, 5) * rope(k, 2)).sum()
    s2 = (rope(q, 40) * rope(k, 37)).sum()
    torch.testing.assert_close(s1, s2, atol=1e-12, rtol=0)
    torch.testing.assert_close(rope(q, 0), q)  # position 0 is the identity
    torch.testing.assert_close(rope(q, 9).norm(), q.norm())  # a rotation


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_tokenizer_round_trip_and_reload(tmp_path, kind):
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.\n", "All:\nSpeak, speak.\n"] * 5
    tok = Tokenizer.train(texts, kind=kind, vocab_size=200)
    # char keeps every character, newlines included; word and bpe normalise whitespace to single spaces.
    sample = texts[0] if kind == "char" else "Before we proceed any further, hear me speak."
    assert tok.decode(tok.encode(sample)) == sample
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    assert again.to_str() == tok.to_str()
    assert again.encode(texts[0]) == tok.encode(texts[0])


def test_generator_keeps_the_space_after_the_prompt_with_bpe():
    from tformer.tasks import TextGenerator

    torch.manual_seed(0)
    tok = Tokenizer.train(["to be or not to be that is the question"] * 5, kind="bpe", vocab_size=60)
    model = LanguageModel(LMConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, d_ff=32, n_layers=1))
    text = TextGenerator(model, tok).generate("to be", greedy=True, max_new_tokens=6)
    ids = generate(
        model, torch.tensor([tok.encode("to be")]), max_new_tokens=6, greedy=True, eos_id=tok.eos_id
    )
    assert "to be" + text == tok.decode(ids[0].tolist())


def test_unseeded_generation_leaves_the_global_rng_alone():
    model = _lm()
    prompt = torch.randint(4, 50, (1, 3))
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    generate(model, prompt, max_new_tokens=3)
    assert torch.equal(torch.rand(3), want)


def test_prompt_exactly_max_seq_len_cached_equals_uncached():
    model = _lm(max_seq_len=16)
    prompt = torch.randint(4, 50, (1, 16))
    a = generate(model, prompt, max_new_tokens=1, greedy=True, use_cache=True)
    b = generate(model, prompt, max_new_tokens=1, greedy=True, use_cache=False)
    assert torch.equal(a, b)


def test_macro_f1_averages_over_present_classes():
    from tformer.metrics import macro_f1

    assert macro_f1([1, 1], [1, 1], 3) == 1.0
    assert macro_f1([0, 1, 1, 0], [0, 1, 0, 0], 2) == pytest.approx((0.8 + 2 / 3) / 2)


def test_ambiguous_bare_override_is_an_error():
    from tformer.config import ConfigError, RunConfig, apply_overrides

    with pytest.raises(
        ConfigError,
        match="'vocab_size' is a key of model and data; write model.vocab_size or data.vocab_size",
    ):
        apply_overrides(RunConfig(task="lm"), ["vocab_size=123"])
    assert apply_overrides(RunConfig(task="lm"), ["data.vocab_size=123"]).data.vocab_size == 123
