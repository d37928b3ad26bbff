"""2D rotary tables and the reference rotation against transformers."""

from __future__ import annotations

import torch

import nativevit as nv


def test_rope_reference_matches_transformers():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    from nativevit.rope import rope_cos_sin

    grid = [(1, 4, 6), (2, 2, 4)]
    cos, sin = rope_cos_sin(grid, 80)
    assert cos.shape == (40, 40) and cos.dtype == torch.float32
    q, k = torch.randn(40, 3, 80), torch.randn(40, 3, 80)
    ours = nv.ops.apply_rope_2d(q, k, cos, sin, backend="torch")
    theirs = apply_rotary_pos_emb_vision(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_rope_tables_match_transformers():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    from nativevit.rope import rope_cos_sin

    grid = torch.tensor([[1, 6, 10], [2, 4, 4], [1, 16, 8]])
    rot = Qwen2VLVisionRotaryEmbedding(Qwen2VLVisionConfig(embed_dim=1280, num_heads=16))
    hf_cos, hf_sin = rot(torch.zeros(1), get_vision_position_ids(grid, 2))
    cos, sin = rope_cos_sin(grid.tolist(), 80)
    assert torch.equal(torch.cat([cos, cos], -1), hf_cos) and torch.equal(torch.cat([sin, sin], -1), hf_sin)
