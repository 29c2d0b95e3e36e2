"""Rows of one KV cache at different lengths (continuous batching), at the layer level: each row's new keys
land at its own slots, index_select / reorder_ / cat keep every row's length, the slots read never hold
uninitialised memory (so a masked key cannot carry NaN into 0 * value), and the per-row causal mask is
the ordinary causal mask when all rows agree."""

import torch

from tformer.attention.kv_cache import KVCache, RowLengths
from tformer.attention.masks import causal_mask, positions_mask


def _kv(b, t, h=2, d=3, start=0.0):
    k = torch.arange(b * h * t * d, dtype=torch.float32).view(b, h, t, d) + start
    return k, -k


def test_rows_write_at_their_own_slots():
    cache = KVCache(8)
    cache.append(*_kv(3, 4))  # three right-padded prompts of width 4
    RowLengths.set([cache], [4, 1, 2])
    assert cache.length == 4 and cache.lengths.tolist() == [4, 1, 2]
    k, v = _kv(3, 1, start=1000.0)
    out = cache.append(k, v)
    assert cache.lengths.tolist() == [5, 2, 3] and cache.length == 5 and out.k.shape[2] == 5
    for row, slot in enumerate([4, 1, 2]):
        torch.testing.assert_close(cache.k_buf[row, :, slot], k[row, :, 0])
        torch.testing.assert_close(cache.v_buf[row, :, slot], v[row, :, 0])
    assert cache.positions(2).tolist() == [[5, 6], [2, 3], [3, 4]]


def test_slots_read_never_hold_uninitialised_memory():
    """Buffers are allocated empty (NaN here, as an empty allocation may hold): a step that widens the
    view zeroes its new columns for the rows that do not reach them, and cat zero-fills up to the longest,
    so every key and value read is finite."""
    nan = float("nan")
    cache = KVCache(6)
    cache.append(*_kv(2, 3))
    RowLengths.set([cache], [3, 2])
    cache.k_buf[:, :, 3:], cache.v_buf[:, :, 3:] = nan, nan
    out = cache.append(*_kv(2, 1, start=100.0))  # row 0 writes slot 3, row 1 slot 2
    assert not out.k.isnan().any() and not out.v.isnan().any()
    assert torch.count_nonzero(cache.k_buf[1, :, 3]) == 0
    short = KVCache(6)
    short.append(*_kv(1, 1))
    short.k_buf[:, :, 1:], short.v_buf[:, :, 1:] = nan, nan
    joined = KVCache.cat([cache, short])
    assert joined.lengths.tolist() == [4, 3, 1] and joined.length == 4
    assert not joined.k.isnan().any() and not joined.v.isnan().any()
    picked = joined.index_select(torch.tensor([2, 0]))
    assert not picked.k.isnan().any() and torch.equal(picked.k[1], joined.k[0])


def test_select_reorder_and_cat_keep_each_rows_length():
    a, b = KVCache(8), KVCache(8)
    a.append(*_kv(2, 3))
    RowLengths.set([a], [3, 1])
    b.append(*_kv(1, 5, start=50.0))
    joined = KVCache.cat([a, b])
    assert joined.lengths.tolist() == [3, 1, 5] and joined.length == 5
    torch.testing.assert_close(joined.k_buf[2, :, :5], b.k_buf[0, :, :5])
    picked = joined.index_select(torch.tensor([2, 0]))
    assert picked.lengths.tolist() == [5, 3]
    before = joined.k_buf.clone()
    joined.reorder_(torch.tensor([1, 2, 0]))
    assert joined.lengths.tolist() == [1, 5, 3]
    torch.testing.assert_close(joined.k_buf[0, :, :5], before[1, :, :5])
    RowLengths.set([picked], [4, 4])  # equal again: the uniform cache
    assert picked.lengths is None and picked.length == 4


def test_positions_mask_is_causal_per_row():
    positions = torch.tensor([[4, 5], [1, 2]])  # two queries per row, rows at different positions
    mask = positions_mask(positions, 6)
    assert mask.shape == (2, 1, 2, 6)
    assert mask[0, 0].tolist() == [[True] * 5 + [False], [True] * 6]
    assert mask[1, 0].tolist() == [[True, True, False, False, False, False], [True] * 3 + [False] * 3]
    uniform = positions_mask(torch.tensor([[3, 4, 5]]), 6)[0, 0]
    assert torch.equal(uniform, causal_mask(3, 6))
