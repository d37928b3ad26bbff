"""How much padding each way of batching variable-length images leaves (no timing: token counts only).

Items are images (or a video clip) with their token counts, ``t*h*w`` patch tokens of the processor's
grid (``ImageProcessor.grid_for``), for the built-in sets, their union, and a large synthetic mix
drawn from the union's items with a fixed seed. Three ways of batching them:

* ``budget``: ``nv.packing.pack_by_budget(lengths, budget)``, every batch padded to the budget (static
  shapes: CUDA graphs, compiled code without dynamic shapes). An item longer than the budget is a batch
  of its own and is counted at its own length (no padding), and reported as ``oversize``;
* ``bucket``: sorted by length, batches of ``k`` consecutive items, each padded to its longest item;
* ``fixed``: dataset order, batches of ``k`` items, each padded to its longest (a padded ViT's batches).

``padding_fraction = 1 - real tokens / tokens computed`` (computed: what the batches' padded shapes
hold). A packed varlen batch pads nothing; these numbers are what the other ways pay for static shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..packing import pack_by_budget
from ..preprocess import ImageProcessor
from .images import IMAGE_SETS, set_segments
from .results import Row, shape

BUDGETS = (8192, 16384, 32768)
BATCH_SIZES = (4, 8, 16)
MIX_ITEMS = 10_000
MIX_SEED = 0
STRATEGIES = ("budget", "bucket", "fixed")


@dataclass(frozen=True)
class Padding:
    """One strategy on one item list: ``batches``, real ``tokens``, ``computed`` tokens (padded shapes),
    ``oversize`` items (budget only: longer than the budget)."""

    strategy: str
    param: int
    batches: int
    tokens: int
    computed: int
    oversize: int = 0

    @property
    def fraction(self) -> float:
        return 1 - self.tokens / self.computed if self.computed else 0.0

    @property
    def label(self) -> str:
        return f"budget {self.param}" if self.strategy == "budget" else f"{self.strategy} k={self.param}"


def budget_padding(lengths: Sequence[int], budget: int) -> Padding:
    """``pack_by_budget`` batches, each padded to ``budget`` (an oversize item to its own length)."""
    batches = pack_by_budget(lengths, budget)
    sizes = [sum(lengths[i] for i in b) for b in batches]
    computed = sum(max(budget, s) for s in sizes)
    oversize = sum(1 for n in lengths if n > budget)
    return Padding("budget", budget, len(batches), sum(lengths), computed, oversize)


def _chunked(lengths: Sequence[int], k: int) -> tuple[int, int]:
    chunks = [lengths[i : i + k] for i in range(0, len(lengths), k)]
    return len(chunks), sum(len(c) * max(c) for c in chunks)


def bucket_padding(lengths: Sequence[int], k: int) -> Padding:
    """Sorted by length, ``k`` per batch, each batch padded to its longest item."""
    batches, computed = _chunked(sorted(lengths), k)
    return Padding("bucket", k, batches, sum(lengths), computed)


def fixed_padding(lengths: Sequence[int], k: int) -> Padding:
    """Dataset order, ``k`` per batch, each batch padded to its longest item."""
    batches, computed = _chunked(list(lengths), k)
    return Padding("fixed", k, batches, sum(lengths), computed)


def item_sets(
    processor: ImageProcessor, *, mix_items: int = MIX_ITEMS, seed: int = MIX_SEED
) -> list[tuple[str, list[int]]]:
    """``(label, token count per item)``: every built-in set, their union (``all``), and ``mix-<n>``,
    ``mix_items`` items drawn uniformly with replacement from the union's items (seeded)."""
    sets = [(name, [sum(item) for item in set_segments(name, processor)]) for name in IMAGE_SETS]
    union = [n for _, lengths in sets for n in lengths]
    sets.append(("all", union))
    if mix_items:
        rng = np.random.default_rng(seed)
        sets.append((f"mix-{mix_items}", [union[i] for i in rng.integers(0, len(union), mix_items)]))
    return sets


def study(
    sets: Sequence[tuple[str, Sequence[int]]],
    budgets: Sequence[int] = BUDGETS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, list[Padding]]:
    """``{set label: [Padding, ...]}``: every budget, then bucketing and fixed batches at every ``k``."""
    out = {}
    for label, lengths in sets:
        lengths = list(lengths)
        out[label] = (
            [budget_padding(lengths, b) for b in budgets]
            + [bucket_padding(lengths, k) for k in batch_sizes]
            + [fixed_padding(lengths, k) for k in batch_sizes]
        )
    return out


def rows(results: dict[str, list[Padding]], sets: Sequence[tuple[str, Sequence[int]]]) -> list[Row]:
    """CSV rows (benchmark ``packing``, backend = strategy, dtype ``-``: no arithmetic is involved)."""
    items = {label: len(lengths) for label, lengths in sets}
    out = []
    for label, pads in results.items():
        for p in pads:
            key = "budget" if p.strategy == "budget" else "k"
            where = shape(set=label, items=items[label], **{key: p.param})

            def row(metric, value, unit="", p=p, where=where):
                return Row("packing", p.strategy, "-", where, metric, value, unit)

            out += [
                row("padding_fraction", p.fraction),
                row("batches", p.batches, "batches"),
                row("tokens", p.tokens, "tokens"),
                row("computed_tokens", p.computed, "tokens"),
            ]
            if p.strategy == "budget":
                out.append(row("oversize_items", p.oversize, "items"))
    return out


def table(results: dict[str, list[Padding]], *, markdown: bool = False) -> list[str]:
    """Padding % per strategy (rows) and set (columns); an oversize count in brackets."""
    labels = list(results)
    strategies = [p.label for p in next(iter(results.values()))]
    cells = {
        (p.label, label): f"{100 * p.fraction:.1f}%" + (f" [{p.oversize}]" if p.oversize else "")
        for label, pads in results.items()
        for p in pads
    }
    if markdown:
        lines = ["| batching | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        lines += ["| " + s + " | " + " | ".join(cells[(s, lab)] for lab in labels) + " |" for s in strategies]
        return lines
    width = max(len(s) for s in strategies) + 2
    cols = [max(len(lab), *(len(cells[(s, lab)]) for s in strategies)) + 2 for lab in labels]
    lines = ["".ljust(width) + "".join(lab.rjust(c) for lab, c in zip(labels, cols, strict=True))]
    for s in strategies:
        lines.append(
            s.ljust(width) + "".join(cells[(s, lab)].rjust(c) for lab, c in zip(labels, cols, strict=True))
        )
    return lines


def run_packing(
    *,
    max_pixels: int,
    budgets: Sequence[int] = BUDGETS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    mix_items: int = MIX_ITEMS,
    seed: int = MIX_SEED,
    echo: Callable[[str], None] = print,
) -> tuple[list[Row], dict[str, list[Padding]]]:
    """The whole study with the Qwen2-VL processor at ``max_pixels``: prints the table, returns rows."""
    proc = ImageProcessor(max_pixels=max_pixels)
    sets = item_sets(proc, mix_items=mix_items, seed=seed)
    results = study(sets, budgets, batch_sizes)
    echo(
        f"padding left by each way of batching (tokens: Qwen2-VL processor, max_pixels {max_pixels} = "
        f"{max_pixels // (28 * 28)} merged tokens per image; [n]: items longer than the budget)"
    )
    for label, lengths in sets:
        echo(f"  {label}: {len(lengths)} items, {sum(lengths)} tokens, longest {max(lengths)}")
    echo("")
    for line in table(results):
        echo(line)
    return rows(results, sets), results


__all__ = [
    "BATCH_SIZES",
    "BUDGETS",
    "MIX_ITEMS",
    "MIX_SEED",
    "STRATEGIES",
    "Padding",
    "bucket_padding",
    "budget_padding",
    "fixed_padding",
    "item_sets",
    "rows",
    "run_packing",
    "study",
    "table",
]
