"""``CUDAGraphEncoder``: a NativeViT's forward replayed from CUDA graphs captured at fixed token budgets.

Serving encodes batches of every size. A CUDA graph replays one fixed sequence of kernel launches on
fixed buffers, so the runner captures one graph per token budget (powers of two by default), pads each
batch to the smallest budget that fits with a padding image (its own segments: it never touches the real
images) and copies everything the batch's plan holds -- pixel rows, segment offsets of frames and windows,
rotary tables, position-table taps, window permutations -- into that budget's static buffers before
every replay. Segment offsets live in buffers sized for the most segments a budget can hold (every frame
and window holds at least one merge unit), their unused tail repeating the total (empty segments), so a
batch with the same token count but another layout replays the same graph with its own offsets: a graph
keyed by the token count alone would otherwise replay the offsets it was captured with. Batches above the
largest budget run eagerly.

Capture needs a CUDA device and attention kernels that take their segment layout from device buffers
(the ``cuda`` and ``flash_attn`` backends: ``max_seqlen`` is the budget's bound). On other devices the
same code path runs without capture (the buffer and budget logic is the same), which is how it is
tested here.
"""

from __future__ import annotations

import torch

from .model import NativeViT
from .packing import BatchPlan, Segments, WindowLayout

GRAPH_SAFE_ATTENTION = ("cuda", "flash_attn")


def default_budgets(max_tokens: int = 16384, min_tokens: int = 1024) -> list[int]:
    """Powers of two from ``min_tokens`` to ``max_tokens`` (both included when powers of two)."""
    budgets, b = [], 1 << max(0, (min_tokens - 1).bit_length())
    while b <= max_tokens:
        budgets.append(b)
        b *= 2
    return budgets


class _Static:
    """The static buffers of one budget and, on CUDA, its captured graph."""

    def __init__(self, model: NativeViT, budget: int, device: torch.device, dtype: torch.dtype):
        cfg = model.config
        self.budget = budget
        self.max_segments = budget // cfg.merge_unit
        self.window_bound = min(budget, cfg.window_tokens**2 * cfg.merge_unit)
        self.pixel_values = torch.zeros(budget, cfg.patch_dim, dtype=dtype, device=device)
        self.frames_cu = torch.zeros(self.max_segments + 1, dtype=torch.int32, device=device)
        self.windows_cu = torch.zeros(self.max_segments + 1, dtype=torch.int32, device=device)
        self.cos = torch.zeros(budget, cfg.head_dim // 2, dtype=torch.float32, device=device)
        self.sin = torch.zeros_like(self.cos)
        self.order = torch.zeros(budget, dtype=torch.long, device=device)
        self.inverse = torch.zeros(budget, dtype=torch.long, device=device)
        self.positions: tuple[torch.Tensor, ...] | None = None  # allocated on the first load
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def load(self, pixel_values: torch.Tensor, plan: BatchPlan) -> BatchPlan:
        """Copy a budget-sized batch and its plan into the buffers; the plan of the buffers."""
        self.pixel_values.copy_(pixel_values)
        frames = _into(plan.segments, self.frames_cu, self.max_segments, self.budget)
        windows = None
        if plan.windows is not None:
            self.order.copy_(plan.windows.order)
            self.inverse.copy_(plan.windows.inverse)
            segments = _into(plan.windows.segments, self.windows_cu, self.max_segments, self.window_bound)
            windows = WindowLayout(self.order, self.inverse, segments)
        cos = sin = None
        if plan.cos is not None:
            cos, sin = self.cos.copy_(plan.cos), self.sin.copy_(plan.sin)
        if plan.positions is not None:
            if self.positions is None:
                self.positions = tuple(torch.zeros_like(t) for t in plan.positions)
            for buffer, t in zip(self.positions, plan.positions):
                buffer.copy_(t)
        return BatchPlan(plan.layout, plan.grid, frames, windows, cos, sin, self.positions)


def _into(segments: Segments, buffer: torch.Tensor, capacity: int, bound: int) -> Segments:
    """The same segments plus empty ones up to ``capacity``, their offsets written into ``buffer``, with
    ``max_seqlen`` the static ``bound`` (a captured kernel's launch grid must cover every batch)."""
    lengths = segments.lengths
    if len(lengths) > capacity:
        raise ValueError(f"{len(lengths)} segments exceed the budget's {capacity}")
    return Segments(lengths + (0,) * (capacity - len(lengths)), out=buffer, max_seqlen=bound)


class CUDAGraphEncoder:
    """Run ``model`` (a :class:`NativeViT`) at fixed token budgets, from CUDA graphs on CUDA.

    Args:
        model: the encoder (its device and dtype are used; eval mode: graphs are for inference).
        budgets: token budgets (patch rows), each a multiple of the merge unit; default
            :func:`default_budgets` (powers of two, 1024 ... 16384).

    ``encoder(pixel_values, grid_thw)`` returns what ``model(pixel_values, grid_thw)`` returns:
    ``(N / merge_unit, out_hidden_size)`` merged tokens of the real images. A batch of N tokens runs at
    the smallest budget >= N (``budget_for``), eagerly when N is above every budget.
    """

    def __init__(self, model: NativeViT, budgets: list[int] | None = None):
        if not isinstance(model, NativeViT):
            raise TypeError(f"model must be a nativevit NativeViT, got {type(model).__name__}")
        budgets = default_budgets() if budgets is None else budgets
        unit = model.config.merge_unit
        bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int) or b < unit or b % unit]
        if not budgets or bad:
            raise ValueError(f"budgets must be positive multiples of the merge unit {unit}, got {budgets}")
        if getattr(model.merger, "uses_plan", False):
            raise ValueError(
                f"CUDAGraphEncoder: the {model.config.model_type} merger reads each image's grid (it merges "
                "frames per image), which a graph captured for a token budget cannot follow"
            )
        self.model = model
        self.budgets = sorted(set(budgets))
        weight = model.patch_embed.proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.capture = self.device.type == "cuda"
        if self.capture:
            like = torch.empty(
                (0, model.config.num_heads, model.config.head_dim), dtype=self.dtype, device=self.device
            )
            from . import ops

            chosen = ops.resolve_backend("attention", model.attn_backend, like).name
            if chosen not in GRAPH_SAFE_ATTENTION:
                raise ValueError(
                    f"attention backend {chosen!r} reads segment lengths on the host, which a CUDA graph "
                    f"would freeze; use attn_backend in {GRAPH_SAFE_ATTENTION}"
                )
        self._static: dict[int, _Static] = {}
        self.replays = 0

    def budget_for(self, num_tokens: int) -> int | None:
        """The smallest budget holding ``num_tokens`` patch rows, or None (run eagerly)."""
        return next((b for b in self.budgets if b >= num_tokens), None)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        grid = model._check_inputs(pixel_values, grid_thw)
        n = pixel_values.shape[0]
        budget = self.budget_for(n)
        if budget is None:
            return model(pixel_values, grid_thw)
        extra = budget - n
        if extra:  # a padding image: frames of one merge block, each its own segment
            m = cfg.spatial_merge_size
            grid = [*grid, (extra // cfg.merge_unit, m, m)]
            pixel_values = torch.cat([pixel_values, pixel_values.new_zeros(extra, pixel_values.shape[1])])
        plan = model.plan(grid, device=self.device)
        static = self._static.get(budget)
        if static is None:
            static = self._static[budget] = _Static(model, budget, self.device, self.dtype)
        static_plan = static.load(pixel_values.to(self.dtype), plan)
        if not self.capture:
            out = self._forward(static, static_plan)
        else:
            if static.graph is None:
                self._capture(static, static_plan)
            static.graph.replay()
            self.replays += 1
            out = static.output
        return out[: n // cfg.merge_unit].clone()

    def _forward(self, static: _Static, plan: BatchPlan) -> torch.Tensor:
        x, _ = self.model._run(static.pixel_values, plan, deepstack=False)
        return self.model.merger(x)

    def _capture(self, static: _Static, plan: BatchPlan) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: allocator, kernel autotuning, lazy init
                self._forward(static, plan)
        torch.cuda.current_stream().wait_stream(stream)
        static.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(static.graph):
            static.output = self._forward(static, plan)
