"""The static KV cache: allocated once with the expected size (n_kv_heads with GQA), written in place, its
storage unchanged across decoding steps (LM, translator greedy and beam), and equal to the full pass."""

import pytest
import torch

from tformer.attention.multihead import KVCache, MultiHeadAttention
from tformer.config import LMConfig, ModelConfig
from tformer.inference import beam_search, greedy_decode
from tformer.inference.sampling import generate
from tformer.models import LanguageModel, Seq2Seq

BOS, EOS = 1, 2


def _lm(n_kv_heads=2, max_seq_len=32):
    torch.manual_seed(0)
    c = LMConfig(
        vocab_size=40,
        d_model=32,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        d_ff=64,
        n_layers=2,
        max_seq_len=max_seq_len,
    )
    return LanguageModel(c).double().eval()


def _seq2seq(n_kv_heads=2):
    torch.manual_seed(0)
    c = ModelConfig(
        src_vocab_size=30,
        tgt_vocab_size=25,
        d_model=32,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        d_ff=64,
        n_layers=2,
        dropout=0.0,
        max_seq_len=24,
    )
    return Seq2Seq(c).double().eval()


def test_lm_cache_is_preallocated_with_kv_heads_and_written_in_place():
    model = _lm(n_kv_heads=2)
    ids = torch.randint(4, 40, (3, 12))
    full = model(ids).logits
    cache = model.new_cache(capacity=16)
    first = model(ids[:, :5], cache=cache)
    assert first.cache is cache
    layer = cache.kv[0]
    # (B, n_kv_heads, capacity, d_head), not n_heads: GQA's smaller cache
    assert layer.k_buf.shape == layer.v_buf.shape == (3, 2, 16, 8)
    ptrs = [(kv.k_buf.data_ptr(), kv.v_buf.data_ptr()) for kv in cache.kv]
    steps = [first.logits]
    for t in range(5, 12):
        steps.append(model(ids[:, t : t + 1], cache=cache).logits)
        assert [(kv.k_buf.data_ptr(), kv.v_buf.data_ptr()) for kv in cache.kv] == ptrs
    assert cache.length == 12 and layer.k.shape == (3, 2, 12, 8)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)


def test_gqa_cache_is_smaller_by_the_group_factor():
    ids = torch.randint(4, 40, (1, 4))
    sizes = {}
    for n_kv in (4, 2, 1):
        out = _lm(n_kv_heads=n_kv)(ids, use_cache=True)
        sizes[n_kv] = sum(kv.k_buf.numel() + kv.v_buf.numel() for kv in out.cache.kv)
        assert out.cache.capacity == 32  # use_cache alone: max_seq_len positions
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1] == 2 * 2 * 1 * 4 * 32 * 8


def test_last_only_logits_equal_the_last_row():
    model = _lm()
    ids = torch.randint(4, 40, (2, 9))
    torch.testing.assert_close(
        model(ids, last_only=True).logits, model(ids).logits[:, -1:], atol=1e-12, rtol=0
    )


def test_cache_overflow_and_capacity_errors():
    model = _lm(max_seq_len=32)
    cache = model.new_cache(capacity=4)
    model(torch.randint(4, 40, (1, 3)), cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow: 3 cached \\+ 2 new positions > capacity 4"):
        model(torch.randint(4, 40, (1, 2)), cache=cache, checked=True)
    with pytest.raises(ValueError, match="capacity must be in \\[1, max_seq_len=32\\], got 33"):
        model.new_cache(capacity=33)


def test_reorder_in_place_equals_index_select():
    mha = MultiHeadAttention(16, 4, n_kv_heads=2).eval()
    cache = KVCache(8)
    mha(torch.randn(3, 5, 16), causal=True, past=cache)
    index = torch.tensor([2, 0, 0])
    expected = cache.index_select(index)
    ptr = cache.k_buf.data_ptr()
    cache.reorder_(index)
    assert cache.k_buf.data_ptr() == ptr
    assert torch.equal(cache.k, expected.k) and torch.equal(cache.v, expected.v)
    with pytest.raises(ValueError, match="keeps the batch size 3; got 2 rows"):
        cache.reorder_(torch.tensor([0, 1]))


def _record_storage(model, monkeypatch):
    """Wrap decode_step to record, per call, the data pointers of every layer's self-attention buffers."""
    seen = []
    inner = model.decode_step

    def step(tgt, cache, **kw):
        out = inner(tgt, cache, **kw)
        seen.append(tuple(kv.k_buf.data_ptr() for kv in cache.self_kv))
        return out

    monkeypatch.setattr(model, "decode_step", step)
    return seen


@pytest.mark.parametrize("beam", [1, 3])
def test_translator_cache_storage_never_changes(monkeypatch, beam):
    model = _seq2seq(n_kv_heads=2)
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]])
    seen = _record_storage(model, monkeypatch)
    if beam == 1:
        hyps = greedy_decode(model, src, bos_id=BOS, eos_id=EOS, max_len=10)
        assert len(hyps) == 2
    else:
        results = beam_search(model, src, bos_id=BOS, eos_id=EOS, beam_size=beam, max_len=10)
        assert len(results) == 2
    assert len(seen) > 1 and len(set(seen)) == 1  # one allocation for the whole decode


def test_translator_cache_size_with_gqa():
    model = _seq2seq(n_kv_heads=1)
    memory, mask, _ = model.encode(torch.tensor([[5, 6, 2]]))
    cache = model.start_cache(memory, mask, capacity=6)
    model.decode_step(torch.tensor([[BOS]]), cache)
    assert cache.self_kv[0].k_buf.shape == (1, 1, 6, 8)  # (B, n_kv_heads, capacity, d_head)
    assert cache.cross_kv[0].k.shape == (1, 1, 3, 8)
    assert cache.length == 1


def test_generate_reuses_its_buffers_past_the_window():
    """Past max_seq_len the cached generator clears and refills the same buffers; cached == uncached."""
    model = _lm(max_seq_len=16)
    prompt = torch.randint(4, 40, (2, 5))
    a = generate(model, prompt, max_new_tokens=30, greedy=True, use_cache=True)
    b = generate(model, prompt, max_new_tokens=30, greedy=True, use_cache=False)
    assert a.shape == (2, 35)
    assert torch.equal(a[:, :16], b[:, :16])  # identical while the text fits in the window


def test_the_caches_live_in_kv_cache_and_keep_their_old_import_path():
    from tformer.attention import kv_cache, multihead

    assert multihead.KVCache is kv_cache.KVCache and multihead.KV is kv_cache.KV
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    static = kv_cache.KVCache(8)
    static.append(k, v)
    for cache in (kv_cache.KV(k, v), static):  # both LayerKVs: what a layer reads back
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and cache.length == 4
        kept = cache.index_select(torch.tensor([1]))
        assert torch.equal(kept.k, k[1:]) and kept.length == 4
