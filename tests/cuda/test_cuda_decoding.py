"""Decoding on the GPU: the KV cache and teacher forcing agree, beam 1 is greedy, beam search and generation
give on the device the tokens they give on the CPU.

Tolerances: float32 logits of cached steps within 1e-4 of the one-pass forward (different kernels per
length: one query row against many); log-probability scores within 1e-3 of the teacher-forced ones.
Token equality between devices holds for these random models because their top two logits are far apart
compared with float32 rounding (checked: the test fails loudly on a near tie rather than passing by luck).
"""

import pytest
import torch

from tformer.config import LMConfig, Seq2SeqConfig
from tformer.inference import beam_search, generate, greedy_decode
from tformer.models import LanguageModel, Seq2Seq

pytestmark = pytest.mark.cuda

BOS, EOS = 1, 2


def _translator(device):
    torch.manual_seed(0)
    c = Seq2SeqConfig(
        src_vocab_size=40, tgt_vocab_size=35, d_model=64, n_heads=4, d_ff=128, n_layers=2,
        dropout=0.0, max_seq_len=48,
    )  # fmt: skip
    return Seq2Seq(c).eval().to(device)


def _lm(device, **kw):
    torch.manual_seed(0)
    c = LMConfig(
        vocab_size=50, d_model=64, n_heads=4, d_ff=128, n_layers=2, dropout=0.0, max_seq_len=40, **kw
    )
    return LanguageModel(c).eval().to(device)


def _src(device):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 40, (5, 11), generator=g)
    src[2, 7:] = 0
    return src.to(device)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_lm_cached_steps_equal_one_pass(device, n_kv_heads):
    model = _lm(device, n_kv_heads=n_kv_heads)
    ids = torch.randint(4, 50, (3, 20), device=device)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(capacity=24)
        steps = [model(ids[:, :6], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 20)]
    assert cache.length == 20 and full.device.type == device.type
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_generation_with_and_without_cache_and_across_devices(device):
    model = _lm(device)
    prompt = torch.randint(4, 50, (2, 5), device=device)
    cached = generate(model, prompt, max_new_tokens=12, greedy=True)
    plain = generate(model, prompt, max_new_tokens=12, greedy=True, use_cache=False)
    assert cached.device.type == device.type
    assert torch.equal(cached, plain)
    on_cpu = generate(model.to("cpu"), prompt.cpu(), max_new_tokens=12, greedy=True)
    assert torch.equal(cached.cpu(), on_cpu)
    # sampling with a seed draws the same tokens twice on the device
    a = generate(model.to(device), prompt, max_new_tokens=8, top_k=10, seed=3)
    b = generate(model, prompt, max_new_tokens=8, top_k=10, seed=3)
    assert torch.equal(a, b)


def _teacher_forced(model, src_row, tokens, finished):
    tgt = torch.tensor([[BOS, *tokens]], device=src_row.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(src_row[None], tgt).logits[0].double(), -1)
    logp[:, [0, BOS]] = float("-inf")  # decoding never emits PAD or BOS
    return sum(logp[i, t].item() for i, t in enumerate([*tokens, EOS] if finished else tokens))


def test_cached_decoding_scores_are_teacher_forced_and_beam_one_is_greedy(device):
    model, src = _translator(device), _src(device)
    greedy = greedy_decode(model, src, bos_id=BOS, eos_id=EOS, max_len=14)
    beam1 = beam_search(model, src, bos_id=BOS, eos_id=EOS, beam_size=1, length_penalty_alpha=0.0, max_len=14)
    for row, g, b in zip(src, greedy, beam1, strict=True):
        assert b[0].tokens == g.tokens
        assert b[0].score == pytest.approx(g.score, abs=1e-4)
        assert g.score == pytest.approx(_teacher_forced(model, row, g.tokens, g.finished), abs=1e-3)
    beams = beam_search(model, src, bos_id=BOS, eos_id=EOS, beam_size=4, max_len=14, n_best=2)
    cpu = beam_search(model.to("cpu"), src.cpu(), bos_id=BOS, eos_id=EOS, beam_size=4, max_len=14, n_best=2)
    for ours, ref in zip(beams, cpu, strict=True):
        assert [h.tokens for h in ours] == [h.tokens for h in ref]
        assert [h.score for h in ours] == pytest.approx([h.score for h in ref], abs=1e-3)
