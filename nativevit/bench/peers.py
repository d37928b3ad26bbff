"""What the kernel benchmark times: our backends and the peers' ways of running the same two ops.

Every implementation is an :class:`Impl`. Given one :class:`Problem` (the segments, and q, k, v as
strided views of one fused ``(total, 3, heads, head_dim)`` buffer, as the encoder makes them) it
prepares a :class:`Prepared` call: whatever a user of that peer builds once per batch (a padded
buffer, a ``BlockMask``, cos/sin in the peer's layout) is built here, outside the timed call, and
its cost is reported apart (``setup_seconds``).

Attention peers:

* ``sdpa_per_image``: ``scaled_dot_product_attention`` once per segment (what vLLM runs on CPU);
* ``sdpa_padded``: one SDPA over the batch padded to the longest segment with a key-padding mask
  (transformers' and timm NaFlexViT's padded batches). The batch stays padded between layers in such a
  model, so the buffer is padded once and the call runs on it; credited with the useful FLOPs only;
* ``flex_document``: ``torch.compile``'d FlexAttention with a document ``BlockMask`` (``doc[q] == doc[k]``);
* ``varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA only, FlashAttention-2 inside);
* ``flash_attn_varlen_func`` (package ``flash-attn``) and ``xformers_blockdiag`` (xformers'
  ``memory_efficient_attention`` with a ``BlockDiagonalMask``), when installed.

RoPE peers: ``hf_rotate_half`` (transformers' vision rotation: fp32 math, full-width cos/sin, halves
swapped with a concatenation) and ``flash_attn_rotary`` (flash-attn's rotary kernel, CUDA).

Our backends are the registered ones of ``nativevit.ops`` (``Impl.ours``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import ops
from ..backends import backends as registered_backends
from ..backends.registry import triton_interpreted
from ..packing import Segments
from .env import synchronize


@dataclass
class Problem:
    """One batch of one op: segment ``lengths``, ``heads`` x ``head_dim`` at ``dtype`` on ``device``.

    ``qkv``: the fused ``(total, 3, heads, head_dim)`` leaf buffer (``requires_grad`` for backward runs);
    ``q, k, v``: its views; ``cos, sin``: ``(total, head_dim // 2)`` float32 rotary tables (rope).
    """

    op: str
    lengths: list[int]
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    qkv: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    segments: Segments = field(init=False)

    def __post_init__(self):
        self.segments = Segments(self.lengths, self.device)

    @property
    def q(self) -> torch.Tensor:
        return self.qkv[:, 0]

    @property
    def k(self) -> torch.Tensor:
        return self.qkv[:, 1]

    @property
    def v(self) -> torch.Tensor:
        return self.qkv[:, 2]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def detached(self) -> Problem:
        """The same problem on inputs that do not require grad (forward-only calls: some peers refuse
        inputs that require grad where they have no backward)."""
        return dataclasses.replace(self, qkv=self.qkv.detach())

    @classmethod
    def make(
        cls, op: str, lengths: Sequence[int], heads: int, head_dim: int, dtype, device, *, grad: bool, seed=0
    ) -> Problem:
        g = torch.Generator().manual_seed(seed)
        total = sum(lengths)
        qkv = torch.randn(total, 3, heads, head_dim, generator=g).to(device=device, dtype=dtype)
        angles = torch.rand(total, head_dim // 2, generator=g) * 100
        return cls(
            op,
            list(lengths),
            heads,
            head_dim,
            dtype,
            torch.device(device),
            qkv.requires_grad_(grad),
            angles.cos().to(device),
            angles.sin().to(device),
        )


@dataclass
class Prepared:
    """A ready call of one implementation.

    ``forward()``: the timed call, output(s) in the implementation's own layout; ``inputs``: the leaf
    tensors gradients are taken for; ``outputs(out)``: the output(s) in the packed ``(total, heads,
    head_dim)`` layout; ``grad_outputs(douts)``: packed upstream gradients in the implementation's layout;
    ``input_grads(grads)``: gradients of ``inputs`` as the packed ``(total, 3, heads, head_dim)`` qkv
    gradient; ``setup_seconds``: what preparing cost (e.g. building a ``BlockMask``), None if nothing.
    """

    forward: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]
    inputs: tuple[torch.Tensor, ...]
    outputs: Callable = lambda out: out if isinstance(out, tuple) else (out,)
    grad_outputs: Callable = lambda douts: douts
    input_grads: Callable = lambda grads: grads[0]
    setup_seconds: float | None = None


@dataclass(frozen=True)
class Impl:
    """One implementation of ``op``: ``unavailable(device)`` says why it cannot run there (None: it can),
    ``rejects(problem)`` why it cannot take this dtype or head dim; ``prepare(problem)`` builds the call.
    ``ours``: a registered nativevit backend (else a peer); ``what``: one line for the report."""

    name: str
    op: str
    what: str
    prepare: Callable[[Problem], Prepared]
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    rejects: Callable[[Problem], str | None] = lambda problem: None
    ours: bool = False


def _needs_cuda(what: str, module: str | None = None) -> Callable[[torch.device], str | None]:
    def unavailable(device: torch.device) -> str | None:
        if module is not None and importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed"
        if device.type != "cuda":
            return f"{what} runs on CUDA only"
        return None

    return unavailable


def _half_only(problem: Problem) -> str | None:
    if problem.dtype not in (torch.float16, torch.bfloat16):
        return f"takes fp16/bf16 only, not {str(problem.dtype).removeprefix('torch.')}"
    return None


def _timed(build: Callable[[], object], device) -> tuple[object, float]:
    synchronize(device)
    t0 = time.perf_counter()
    out = build()
    synchronize(device)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- our backends


def our_impls(op: str) -> list[Impl]:
    """Every registered backend of ``op``, as implementations (``padded``: see :func:`excluded`)."""
    out = []
    for name, backend in registered_backends(op).items():

        def unavailable(device, backend=backend, name=name):
            why = backend.unavailable(device.type)
            if why is None and name == "triton" and device.type == "cpu" and triton_interpreted():
                return "runs interpreted on CPU (TRITON_INTERPRET=1): not a speed measurement"
            return why

        def rejects(problem, backend=backend):
            return backend.rejects(problem.q)

        prepare = _our_attention(name) if op == "attention" else _our_rope(name)
        out.append(Impl(name, op, f"nativevit backend {name!r}", prepare, unavailable, rejects, ours=True))
    return out


def _our_attention(name: str) -> Callable[[Problem], Prepared]:
    def prepare(p: Problem) -> Prepared:
        segments = p.segments
        backend = ops.resolve_backend("attention", name, p.q)
        if backend.prepare is not None:
            backend.prepare(segments, p.q)
        return Prepared(
            lambda: ops.varlen_attention(p.q, p.k, p.v, segments, scale=p.scale, backend=name), (p.qkv,)
        )

    return prepare


def _our_rope(name: str) -> Callable[[Problem], Prepared]:
    def prepare(p: Problem) -> Prepared:
        return Prepared(lambda: ops.apply_rope_2d(p.q, p.k, p.cos, p.sin, backend=name), (p.qkv,))

    return prepare


# ----------------------------------------------------------------------------- attention peers


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``(n, heads, dim)`` -> ``(1, heads, n, dim)`` (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def _sdpa_per_image(p: Problem) -> Prepared:
    bounds = []
    start = 0
    for n in p.lengths:
        if n:
            bounds.append((start, start + n))
        start += n

    def forward():
        outs = [
            F.scaled_dot_product_attention(
                _heads_first(p.q[s:e]), _heads_first(p.k[s:e]), _heads_first(p.v[s:e]), scale=p.scale
            )[0].transpose(0, 1)
            for s, e in bounds
        ]
        return torch.cat(outs) if outs else p.q.new_empty(0, p.heads, p.head_dim)

    return Prepared(forward, (p.qkv,))


def _sdpa_padded(p: Problem) -> Prepared:
    lengths = [n for n in p.lengths if n]
    batch, longest = len(lengths), max(lengths)
    t0 = time.perf_counter()
    sizes = torch.tensor(lengths, device=p.device)
    valid = torch.arange(longest, device=p.device)[None, :] < sizes[:, None]  # (B, L)
    buffer = p.qkv.detach().new_zeros(batch, longest, 3, p.heads, p.head_dim)
    buffer[valid] = p.qkv.detach()
    buffer.requires_grad_(p.qkv.requires_grad)
    mask = valid[:, None, None, :]  # (B, 1, 1, L): keys only, as a key-padding mask
    setup = time.perf_counter() - t0

    def forward():
        q, k, v = (buffer[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p.scale)

    def outputs(out):
        return (out.transpose(1, 2)[valid],)  # (total, H, D)

    def grad_outputs(douts):
        (dout,) = douts
        padded = dout.new_zeros(batch, longest, p.heads, p.head_dim)
        padded[valid] = dout
        return (padded.transpose(1, 2),)

    return Prepared(
        forward,
        (buffer,),
        outputs=outputs,
        grad_outputs=grad_outputs,
        input_grads=lambda grads: grads[0][valid],
        setup_seconds=setup,
    )


_FLEX: dict[str, Callable] = {}


def _flex_document(p: Problem) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        # dynamic: one compilation per dtype and head dim, not one per batch length
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=True)
    flex = _FLEX["fn"]
    doc = torch.repeat_interleave(
        torch.arange(len(p.lengths), device=p.device), torch.tensor(p.lengths, device=p.device)
    )

    def document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    block_mask, setup = _timed(
        lambda: create_block_mask(document, None, None, p.total, p.total, device=p.device), p.device
    )

    def forward():
        out = flex(
            _heads_first(p.q), _heads_first(p.k), _heads_first(p.v), block_mask=block_mask, scale=p.scale
        )
        return out[0].transpose(0, 1)  # (total, H, D)

    return Prepared(forward, (p.qkv,), setup_seconds=setup)


def _varlen_attn(p: Problem) -> Prepared:
    from torch.nn.attention.varlen import varlen_attn

    cu, longest = p.segments.cu_seqlens, p.segments.max_seqlen
    return Prepared(lambda: varlen_attn(p.q, p.k, p.v, cu, cu, longest, longest, scale=p.scale), (p.qkv,))


def _flash_attn_varlen(p: Problem) -> Prepared:
    from flash_attn import flash_attn_varlen_func

    cu, longest = p.segments.cu_seqlens, p.segments.max_seqlen
    return Prepared(
        lambda: flash_attn_varlen_func(p.q, p.k, p.v, cu, cu, longest, longest, softmax_scale=p.scale),
        (p.qkv,),
    )


def _xformers_blockdiag(p: Problem) -> Prepared:
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    bias, setup = _timed(lambda: BlockDiagonalMask.from_seqlens([n for n in p.lengths if n]), p.device)

    def forward():
        return memory_efficient_attention(p.q[None], p.k[None], p.v[None], attn_bias=bias, scale=p.scale)[0]

    return Prepared(forward, (p.qkv,), setup_seconds=setup)


ATTENTION_PEERS = (
    Impl("sdpa_per_image", "attention", "torch SDPA called once per image (vLLM on CPU)", _sdpa_per_image),
    Impl(
        "sdpa_padded",
        "attention",
        "torch SDPA on the batch padded to the longest, key-padding mask (transformers, timm NaFlexViT)",
        _sdpa_padded,
    ),
    Impl(
        "flex_document",
        "attention",
        "torch.compile(flex_attention) with a document BlockMask",
        _flex_document,
    ),
    Impl(
        "varlen_attn",
        "attention",
        "torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside)",
        _varlen_attn,
        _needs_cuda("torch.nn.attention.varlen.varlen_attn"),
        _half_only,
    ),
    Impl(
        "flash_attn_varlen_func",
        "attention",
        "flash-attn's flash_attn_varlen_func",
        _flash_attn_varlen,
        _needs_cuda("flash_attn_varlen_func", "flash_attn"),
        _half_only,
    ),
    Impl(
        "xformers_blockdiag",
        "attention",
        "xformers memory_efficient_attention with a BlockDiagonalMask",
        _xformers_blockdiag,
        lambda device: (
            None if importlib.util.find_spec("xformers") else "the xformers package is not installed"
        ),
    ),
)


# ----------------------------------------------------------------------------- rope peers


def _hf_rotate_half(p: Problem) -> Prepared:
    # transformers keeps cos/sin of the full head width: the half-width tables repeated twice
    cos = torch.cat([p.cos, p.cos], dim=-1)[:, None, :]  # (total, 1, D) float32
    sin = torch.cat([p.sin, p.sin], dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

    return Prepared(lambda: (rotate(p.q), rotate(p.k)), (p.qkv,))


def _flash_attn_rotary(p: Problem) -> Prepared:
    from flash_attn.layers.rotary import apply_rotary_emb

    cos, sin = p.cos.to(p.dtype), p.sin.to(p.dtype)  # the kernel takes cos/sin in the input dtype

    def forward():
        return (
            apply_rotary_emb(p.q[None], cos, sin, interleaved=False)[0],
            apply_rotary_emb(p.k[None], cos, sin, interleaved=False)[0],
        )

    return Prepared(forward, (p.qkv,))


ROPE_PEERS = (
    Impl(
        "hf_rotate_half",
        "rope",
        "transformers' vision rotation (fp32, cat-based rotate_half)",
        _hf_rotate_half,
    ),
    Impl(
        "flash_attn_rotary",
        "rope",
        "flash-attn's apply_rotary_emb (Triton), one call each for q and k",
        _flash_attn_rotary,
        _needs_cuda("flash_attn.layers.rotary", "flash_attn"),
    ),
)

# Registered backends the suite leaves out unless asked for by name, and why.
EXCLUDED = {
    "padded": "our padded baseline pads and unpads around every call; the peer sdpa_padded times the "
    "same SDPA on a batch kept padded, as a padded model runs it (ask for it with --impls padded)",
}


def impls(op: str, *, peers: bool = True) -> list[Impl]:
    """Our backends of ``op`` and (``peers``) the peers', in report order."""
    return our_impls(op) + (list(ATTENTION_PEERS if op == "attention" else ROPE_PEERS) if peers else [])


def impl_names(op: str) -> list[str]:
    return [i.name for i in impls(op)]


__all__ = [
    "ATTENTION_PEERS",
    "EXCLUDED",
    "ROPE_PEERS",
    "Impl",
    "Prepared",
    "Problem",
    "impl_names",
    "impls",
    "our_impls",
]
