"""``torch.compile`` of an encoder on the ``triton`` backend: the attention work lists are built eagerly
by the backend's ``prepare`` hook (``NativeViT._prepare``), never inside the graph, so new batch layouts
reuse the graph. Small shapes: under the interpreter every launch runs in Python."""

from __future__ import annotations

import pytest
import torch
from nativevit.kernels import varlen_attention as va
from torch._dynamo.testing import CompileCounterWithBackend

import nativevit as nv

pytestmark = pytest.mark.skipif(
    "triton" not in nv.ops.available_backends()["attention"],
    reason="triton attention backend unavailable (no GPU and no TRITON_INTERPRET=1)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# image counts, sizes, segment counts and a video differ from batch to batch
GRIDS = [
    [[1, 4, 6], [1, 2, 2]],
    [[1, 6, 6], [2, 2, 4], [1, 2, 2]],
    [[1, 8, 4], [1, 4, 2], [1, 2, 6], [1, 2, 2]],
]


def test_compiled_encoder_reads_prebuilt_work_lists_and_compiles_once(monkeypatch):
    builds = []  # torch.compiler.is_compiling() at every work-list build
    real_build = va._build_work_list

    def spy(lengths, block, device):
        builds.append(torch.compiler.is_compiling())
        return real_build(lengths, block, device)

    monkeypatch.setattr(va, "_build_work_list", spy)
    torch._dynamo.reset()  # other tests' graphs of the same code count toward the recompile limit
    torch.manual_seed(0)
    cfg = nv.VisionConfig.tiny()
    model = nv.NativeViT(cfg, attn_backend="triton", rope_backend="triton").to(DEVICE)
    with torch.no_grad():  # default init zeroes biases and sets norms to one, which hides mistakes
        for p in model.parameters():
            p.normal_(0, 0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True)
    graphs = []
    for i, grid in enumerate(GRIDS):
        grid = torch.tensor(grid, device=DEVICE)
        g = torch.Generator().manual_seed(i)
        px = torch.randn(int(grid.prod(-1).sum()), cfg.patch_dim, generator=g).to(DEVICE)
        model.zero_grad()
        out = compiled(px, grid)
        out.square().sum().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref = model(px, grid)
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
        graphs.append(counter.frame_count)
    assert graphs[1] > 0 and graphs[2] == graphs[1], f"graphs compiled after each batch: {graphs}"
    # forward and backward lists (two block sizes) per batch, compiled and eager runs: all built eagerly
    assert len(builds) >= 2 * len(GRIDS) and not any(builds), builds


def test_raw_cu_seqlens_under_compile_ask_for_segments():
    q = torch.randn(8, 1, 16, device=DEVICE)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)

    def attend(q, cu):
        return nv.ops.varlen_attention(q, q, q, cu, 5, backend="triton")

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="raw cu_seqlens under torch.compile.*pass the Segments"):
        compiled(q, cu)
    torch.testing.assert_close(attend(q, cu), nv.ops.varlen_attention(q, q, q, cu, backend="torch"))
