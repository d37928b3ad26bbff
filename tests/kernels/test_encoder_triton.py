"""The encoder with the ``triton`` backends equals the ``torch`` backends (forward, backward) and trains."""

from __future__ import annotations

import pytest
import torch

import nativevit as nv

pytestmark = pytest.mark.skipif(
    "triton" not in nv.ops.available_backends()["attention"],
    reason="triton backend unavailable (no GPU and no TRITON_INTERPRET=1)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 16 + 12 + 2 frames x 4 tokens: a 1-merge-block image and a two-frame video among them
GRID = torch.tensor([[1, 4, 4], [1, 2, 6], [2, 2, 2]])
CONFIGS = {
    "tiny-hd16": dict(),
    "hd80": dict(embed_dim=160, num_heads=2, out_hidden_size=32),
}


def make_model(overrides, backend, seed=0):
    torch.manual_seed(seed)
    model = nv.NativeViT(nv.VisionConfig.tiny(**overrides), attn_backend=backend, rope_backend=backend)
    with torch.no_grad():  # default init zeroes biases and sets norms to one, which hides mistakes
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.to(DEVICE)


def pixels(model, seed=1):
    n = int((GRID[:, 0] * GRID[:, 1] * GRID[:, 2]).sum())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.config.patch_dim, generator=g).to(DEVICE)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_and_parameter_grads_equal_torch_backend(name):
    models = {b: make_model(CONFIGS[name], b) for b in ("triton", "torch")}
    x = pixels(models["torch"])
    target = torch.randn(x.shape[0] // 4, models["torch"].config.out_hidden_size, device=DEVICE)
    outs = {}
    for backend, model in models.items():
        out = model(x, GRID)
        (out - target).square().mean().backward()
        outs[backend] = out.detach()
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)
    grads_torch = dict(models["torch"].named_parameters())
    for pname, p in models["triton"].named_parameters():
        ref = grads_torch[pname].grad
        torch.testing.assert_close(
            p.grad, ref, rtol=1e-4, atol=1e-5, msg=lambda m, pname=pname: f"{pname}: {m}"
        )


def test_sgd_steps_decrease_the_loss():
    model = make_model(CONFIGS["hd80"], "triton")
    x = pixels(model)
    target = torch.randn(x.shape[0] // 4, model.config.out_hidden_size, device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x, GRID) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), (
        f"loss did not decrease every step: {losses}"
    )


@pytest.mark.slow  # ~12 s: dynamo + AOT autograd tracing of a whole block
def test_block_traces_fullgraph_with_torch_compile():
    """One encoder block (norms, qkv, rope, varlen attention, MLP) compiles with no graph break,
    including the first call on a new batch (the work list is built inside the trace)."""
    from nativevit.model import Block

    cfg = nv.VisionConfig.tiny(**{k: v for k, v in CONFIGS["hd80"].items() if k != "out_hidden_size"})
    torch.manual_seed(0)
    blocks = {b: Block(cfg, attn_backend=b, rope_backend=b).to(DEVICE) for b in ("triton", "torch")}
    blocks["torch"].load_state_dict(blocks["triton"].state_dict())
    grid = [tuple(r) for r in GRID.tolist()]
    segments = nv.Segments.from_grid(grid, DEVICE)
    cos, sin = nv.rope.rope_cos_sin(grid, cfg.embed_dim // cfg.num_heads, device=DEVICE)
    x = torch.randn(segments.total, cfg.embed_dim, device=DEVICE, requires_grad=True)
    compiled = torch.compile(blocks["triton"], fullgraph=True, backend="aot_eager")
    out = compiled(x, segments, cos, sin)
    out.square().sum().backward()
    grad, x.grad = x.grad.clone(), None
    ref = blocks["torch"](x, segments, cos, sin)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-5)
