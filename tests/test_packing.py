"""Segments, the padded layout and the per-batch plan."""

from __future__ import annotations

import pytest
import torch

from nativevit.packing import (
    Segments,
    cu_seqlens_from_grid,
    cu_seqlens_from_lengths,
    pad_segments,
    plan_batch,
    unpad_segments,
)


def test_segments_and_padding_roundtrip():
    grid = torch.tensor([[2, 2, 4], [1, 4, 4]])
    cu = cu_seqlens_from_grid(grid)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 8, 16, 32]
    seg = Segments.from_cu_seqlens(cu, 32)
    assert seg.lengths == (8, 8, 16) and seg.max_seqlen == 16
    x = torch.arange(32.0)[:, None]
    padded = pad_segments(x, seg)
    assert padded.shape == (48, 1) and padded[8:16].abs().sum() == 0
    assert torch.equal(unpad_segments(padded, seg), x)


def test_segments_have_one_source_of_truth():
    seg = Segments([3, 0, 5], "cpu")
    assert seg.cu_seqlens.tolist() == [0, 3, 3, 8] and seg.cu_seqlens.dtype == torch.int32
    assert seg.max_seqlen == 5 and seg.total == 8 and seg.num_segments == 3
    assert cu_seqlens_from_lengths([3, 0, 5]).tolist() == [0, 3, 3, 8]
    with pytest.raises(AttributeError, match="immutable"):
        seg.lengths = (8,)
    with pytest.raises(ValueError, match=">= 0"):
        Segments([3, -1])
    with pytest.raises(ValueError, match="at least one segment"):
        Segments([])


def test_segments_from_a_strided_cu_seqlens_view():
    table = torch.tensor([[0, 9], [4, 9], [4, 9], [10, 9]], dtype=torch.int32)
    column = table[:, 0]  # an int32 column view, stride 2
    assert not column.is_contiguous()
    seg = Segments.from_cu_seqlens(column, 10)
    assert seg.lengths == (4, 0, 6) and seg.cu_seqlens.is_contiguous()
    assert seg.cu_seqlens.tolist() == [0, 4, 4, 10]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_plan_layout_round_trip(layout):
    grid = [(1, 4, 6), (2, 2, 2), (1, 8, 8)]
    plan = plan_batch(grid, layout=layout, head_dim=16, window=2)
    n = sum(t * h * w for t, h, w in grid)
    x = torch.randn(n, 3)
    rows = plan.to_layout(x)
    assert rows.shape[0] == plan.segments.num_rows
    assert torch.equal(plan.to_input_order(rows), x)
    cos, sin = plan.rope()
    assert cos.shape == (plan.segments.num_rows, 8) and sin.dtype == torch.float32
    full, relayout = plan.attention(windowed=False)
    assert full is plan.segments and relayout is None
    local, relayout = plan.attention(windowed=True)
    assert local.lengths == plan.windows.segments.lengths
    assert (relayout is not None) == (layout == "padded") and local.padded == (layout == "padded")


def test_plan_from_lengths_and_bad_arguments():
    plan = plan_batch(lengths=[5, 1, 0], layout="padded")
    assert plan.grid is None and plan.windows is None and plan.cos is None
    assert plan.segments.padded and plan.segments.num_rows == 10
    with pytest.raises(ValueError, match="layout"):
        plan_batch(lengths=[1], layout="ragged")
    with pytest.raises(ValueError, match="exactly one"):
        plan_batch([(1, 2, 2)], lengths=[4])
    with pytest.raises(ValueError, match="rotary"):
        plan_batch(lengths=[4]).rope()
    with pytest.raises(ValueError, match="divisible"):
        plan_batch(torch.tensor([[1, 3, 4]]))
