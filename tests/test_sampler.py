"""Token budgets: pack_by_budget, PackedBatch.pad_to, TokenBudgetSampler (single and many ranks)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nativevit as nv
from nativevit.packing import pack_by_budget


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 300), max_size=60), st.integers(1, 256))
@example(lengths=[0, 1], budget=1)  # an empty item after one that fills a batch exactly
def test_pack_by_budget_places_every_index_once_within_budget(lengths, budget):
    batches = pack_by_budget(lengths, budget)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        total = sum(lengths[i] for i in b)
        assert total <= budget or len(b) == 1  # an item over the budget rides alone
    # greedy largest-first never leaves two batches that would both fit into one
    totals = sorted(sum(lengths[i] for i in b) for b in batches)
    if len(totals) >= 2:
        assert totals[0] + totals[1] > budget


def test_pack_by_budget_examples_and_errors():
    assert pack_by_budget([5, 3, 9, 2], 10) == [[2], [0, 1, 3]]
    assert pack_by_budget([12, 1], 10) == [[0], [1]]
    assert pack_by_budget([], 10) == []
    with pytest.raises(ValueError, match="budget"):
        pack_by_budget([1], 0)
    with pytest.raises(ValueError, match=">= 0"):
        pack_by_budget([1, -2], 4)


def test_pad_to_appends_a_padding_image_that_split_drops():
    torch.manual_seed(0)
    model = nv.NativeViT(nv.VisionConfig.tiny()).double().eval()
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    px = torch.randn(32, model.config.patch_dim, dtype=torch.float64)
    batch = nv.PackedBatch.from_grid(px, grid)
    padded = batch.pad_to(64)
    assert padded.num_tokens == 64 and padded.num_padding_images == 1
    assert padded.cu_seqlens.tolist()[-1] == 64 and padded.cu_seqlens.dtype == torch.int32
    with torch.no_grad():
        want = batch.split(model(batch.pixel_values, batch.grid_thw))
        out = model(padded.pixel_values, padded.grid_thw)
        got = padded.split(out)
        feats = padded.split(model.forward_features(padded.pixel_values, padded.grid_thw))
    assert len(got) == len(want) == 2 and [f.shape[0] for f in feats] == [24, 8]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    views = padded.split_views(out)
    assert [len(v) for v in views] == [1, 1] and torch.equal(views[1][0], got[1])
    assert batch.pad_to(32).num_padding_images == 0
    with pytest.raises(ValueError, match="already has 32"):
        batch.pad_to(16)
    with pytest.raises(ValueError, match="multiple of the merge unit 4"):
        batch.pad_to(34)


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_is_deterministic_and_within_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 400, (300,), generator=g).tolist()
    s = nv.TokenBudgetSampler(lengths, 1024, seed=3)
    a, b = _epoch(s, 0), _epoch(nv.TokenBudgetSampler(lengths, 1024, seed=3), 0)
    assert a == b and _epoch(s, 1) != a
    assert len(s) == len(a)
    assert sorted(i for batch in a for i in batch) == list(range(300))
    assert all(sum(lengths[i] for i in batch) <= 1024 for batch in a)
    fixed = list(nv.TokenBudgetSampler(lengths, 1024, shuffle=False))
    assert sorted(i for batch in fixed for i in batch) == list(range(300))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_sampler_splits_evenly_over_ranks(world_size, drop_last):
    lengths = [(37 * i) % 500 + 1 for i in range(101)]
    ranks = [
        _epoch(nv.TokenBudgetSampler(lengths, 700, rank=r, world_size=world_size, drop_last=drop_last), 2)
        for r in range(world_size)
    ]
    counts = {len(r) for r in ranks}
    assert len(counts) == 1  # every rank takes the same number of steps
    seen = [i for r in ranks for batch in r for i in batch]
    total_batches = len(nv.TokenBudgetSampler(lengths, 700, world_size=1).global_batches())
    if drop_last:
        assert len(seen) == len(set(seen))  # nothing repeated
    else:
        assert set(seen) == set(range(101))
        taken = sum(len(r) for r in ranks)  # batches over all ranks: the fewest repeats to even out
        assert taken == -(-total_batches // world_size) * world_size


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        nv.TokenBudgetSampler([], 10)
    with pytest.raises(ValueError, match="rank"):
        nv.TokenBudgetSampler([1], 10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="budget"):
        nv.TokenBudgetSampler([1], 0)
