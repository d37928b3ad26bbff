"""The README's packed fine-tuning loop: token-budget sampler + compiled model + optimizer, no recompiles."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend

import nativevit as nv


class RandomImages(torch.utils.data.Dataset):
    """Stand-in for a processed dataset: each item is ``(patch rows (t*h*w, patch_dim), grid (t, h, w))``."""

    def __init__(self, grids, patch_dim, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = [(torch.randn(t * h * w, patch_dim, generator=g), (t, h, w)) for t, h, w in grids]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    """Pack a batch: rows concatenated, one grid_thw row per image (never padded)."""
    return torch.cat([rows for rows, _ in items]), torch.tensor([grid for _, grid in items])


def test_packed_finetuning_loop_compiles_once():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    grids = [(1, 2 * int(torch.randint(1, 6, (), generator=g)), 2 * int(torch.randint(1, 6, (), generator=g)))
             for _ in range(40)] + [(2, 4, 4)] * 4  # fmt: skip
    cfg = nv.VisionConfig.tiny()
    data = RandomImages(grids, cfg.patch_dim)
    sampler = nv.TokenBudgetSampler([t * h * w for t, h, w in grids], budget=160, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate)

    model = nv.NativeViT(cfg)
    counter = CompileCounterWithBackend("aot_eager")  # counts graphs; users keep the default backend
    compiled = torch.compile(model, backend=counter, dynamic=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    graphs, losses = [], []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for pixel_values, grid_thw in loader:
            tokens = compiled(pixel_values, grid_thw)  # (N/4, out_hidden_size)
            loss = tokens.square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            graphs.append(counter.frame_count)
            losses.append(loss.item())
    assert len(graphs) >= 6 and len(set(sampler.global_batches()[0])) > 1
    assert graphs[2:] == [graphs[1]] * (len(graphs) - 2), f"graphs after each step: {graphs}"
    assert losses[-1] < losses[0]
