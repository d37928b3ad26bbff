"""Plots from results CSVs (matplotlib, the ``plot`` extra). The newest row of each case wins."""

from __future__ import annotations

from pathlib import Path

from .results import latest, parse_shape, read_csv


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; ``RuntimeError`` saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'nativevit[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def encoder_ratios(path: str | Path) -> dict[str, list[tuple[str, float, float]]]:
    """``{dtype: [(set label, work ratio, speedup), ...]}`` from an encoder CSV, in file order.

    The label is the ``set`` field of the row's shape, with ``@<depth>`` added when the file holds
    more than one depth.
    """
    data = latest(read_csv(path), "encoder")
    keys = [
        k for k in data if k[0] == "ratio" and k[3] == "work_ratio" and (k[0], k[1], k[2], "speedup") in data
    ]
    depths = {parse_shape(k[2]).get("depth") for k in keys}
    out: dict[str, list[tuple[str, float, float]]] = {}
    for _, dtype, where, _ in keys:
        fields = parse_shape(where)
        label = fields.get("set", where)
        if len(depths) > 1:
            label += f"@depth{fields.get('depth')}"
        out.setdefault(dtype, []).append(
            (label, data[("ratio", dtype, where, "work_ratio")], data[("ratio", dtype, where, "speedup")])
        )
    return out


def plot_encoder(path: str | Path, out: str | Path | None = None) -> Path:
    """Per image set, the measured packed/padded speedup next to the work ratio, one panel per dtype.
    Writes ``out`` (default: the CSV's path with ``.png``) and returns it."""
    path = Path(path)
    ratios = encoder_ratios(path)
    if not ratios:
        raise ValueError(f"{path} has no encoder ratio rows (work_ratio and speedup) to plot")
    plt = pyplot()
    dtypes = sorted(ratios)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        labels, work, speed = zip(*ratios[dtype], strict=True)
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], work, 0.4, label="work ratio (padded / packed FLOPs)", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], speed, 0.4, label="measured speedup packed vs padded", color="#1f77b4")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels, rotation=30, ha="right")
        ax.set_title(dtype)
        ax.set_ylabel("x (log scale)")
        ax.legend(fontsize=8)
    hardware = path.name.removesuffix("-encoder.csv")
    fig.suptitle(f"nativevit packed vs padded encoder ({hardware})")
    fig.tight_layout()
    out = Path(out) if out is not None else path.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _save(fig, plt, path: Path, out: str | Path | None) -> Path:
    out = Path(out) if out is not None else path.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def strategy_values(path: str | Path) -> dict[str, dict[tuple[str, str], float]]:
    """``{metric: {(strategy, "WxH"): value}}`` from a strategies CSV (the newest row of each case)."""
    out: dict[str, dict[tuple[str, str], float]] = {}
    for (_, _, where, metric), value in latest(read_csv(path), "strategies").items():
        fields = parse_shape(where)
        if "strategy" in fields and "size" in fields:
            out.setdefault(metric, {})[(fields["strategy"], fields["size"])] = value
    return out


def plot_strategies(path: str | Path, out: str | Path | None = None) -> Path:
    """Per strategy and seed size: language-model tokens, encoder GFLOPs and (when timed) the measured
    encoder time, log scale. Writes ``out`` (default: the CSV's path with ``.png``) and returns it."""
    path = Path(path)
    values = strategy_values(path)
    if not values.get("lm_tokens"):
        raise ValueError(f"{path} has no strategies rows to plot")
    plt = pyplot()
    names = _ordered(k[0] for k in values["lm_tokens"])
    sizes = _ordered(k[1] for k in values["lm_tokens"])
    panels = [("lm_tokens", "language-model tokens"), ("encoder_gflop", "encoder GFLOP (packed)")]
    if values.get("latency"):
        panels.append(("latency", "measured encoder time (s)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.4 * len(panels)), squeeze=False)
    width = 0.8 / len(sizes)
    colors = plt.cm.viridis([i / max(len(sizes) - 1, 1) * 0.9 for i in range(len(sizes))])
    for ax, (metric, label) in zip(axes[:, 0], panels, strict=True):
        data = values.get(metric, {})
        for j, size in enumerate(sizes):
            x = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(names))]
            ax.bar(x, [data.get((n, size), float("nan")) for n in names], width, label=size, color=colors[j])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=len(sizes), fontsize=8, title="image W x H")
    fig.suptitle(
        f"resolution strategies through one packed encoder ({path.name.removesuffix('-strategies.csv')})"
    )
    return _save(fig, plt, path, out)


def packing_fractions(path: str | Path) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """``(batching labels, set labels, {(batching, set): padding fraction})`` from a packing CSV."""
    data = {}
    for (strategy, _, where, metric), value in latest(read_csv(path), "packing").items():
        if metric != "padding_fraction":
            continue
        fields = parse_shape(where)
        label = f"budget {fields['budget']}" if "budget" in fields else f"{strategy} k={fields.get('k')}"
        data[(label, fields.get("set", where))] = value
    return _ordered(k[0] for k in data), _ordered(k[1] for k in data), data


def plot_packing(path: str | Path, out: str | Path | None = None) -> Path:
    """Padding fraction of every way of batching (rows) on every item set (columns), as an annotated
    heat map. Writes ``out`` (default: the CSV's path with ``.png``) and returns it."""
    path = Path(path)
    rows, cols, data = packing_fractions(path)
    if not data:
        raise ValueError(f"{path} has no packing padding_fraction rows to plot")
    plt = pyplot()
    grid = [[100 * data.get((r, c), float("nan")) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 3, 0.45 * len(rows) + 1.8))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    for i, r in enumerate(grid):
        for j, v in enumerate(r):
            ax.text(j, i, f"{v:.1f}%", ha="center", va="center", fontsize=8, color="k" if v < 60 else "w")
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    fig.colorbar(im, ax=ax, label="padding % of computed tokens")
    ax.set_title("padding left by each way of batching (packed varlen: 0%)")
    return _save(fig, plt, path, out)


def kernel_rates(path: str | Path, head_dim: int | None = None) -> dict:
    """``{(op, dtype, phase): {impl: {case: rate}}}`` from a kernels CSV at ``head_dim`` (default 80
    when measured, else the smallest): TFLOP/s for attention, GB/s for RoPE."""
    rows = read_csv(path)
    by_op = {op: latest(rows, op) for op in ("attention", "rope")}
    dims = sorted(
        {
            int(f["head_dim"])
            for data in by_op.values()
            for k in data
            if "head_dim" in (f := parse_shape(k[2]))
        }
    )
    if not dims:
        return {}
    if head_dim is None:
        head_dim = 80 if 80 in dims else dims[0]
    out: dict = {}
    for op, data in by_op.items():
        metric = "tflops" if op == "attention" else "gbps"
        for (backend, dtype, where, m), value in data.items():
            fields = parse_shape(where)
            if fields.get("head_dim") != str(head_dim) or "set" not in fields:
                continue
            phase, _, name = m.partition("_")
            if name == metric and phase in ("fwd", "bwd"):
                out.setdefault((op, dtype, phase), {}).setdefault(backend, {})[fields["set"]] = value
    return out


def plot_kernels(path: str | Path, out: str | Path | None = None, head_dim: int | None = None) -> Path:
    """Attention TFLOP/s and RoPE GB/s of every implementation per case, one panel per op, dtype and
    phase (head dim 80 when measured). Writes ``out`` (default: the CSV's path with ``.png``)."""
    path = Path(path)
    rates = kernel_rates(path, head_dim)
    if not rates:
        raise ValueError(f"{path} has no kernel rate rows to plot")
    plt = pyplot()
    keys = sorted(rates)
    panels = _ordered((op, dtype) for op, dtype, _ in keys)
    fig, axes = plt.subplots(len(panels), 2, figsize=(14, 3.6 * len(panels)), squeeze=False)
    for row, (op, dtype) in enumerate(panels):
        for col, phase in enumerate(("fwd", "bwd")):
            ax = axes[row, col]
            by_impl = rates.get((op, dtype, phase), {})
            if not by_impl:
                ax.set_axis_off()
                ax.set_title(f"{op} {dtype} {phase}: nothing measured")
                continue
            cases = _ordered(c for impl in by_impl.values() for c in impl)
            width = 0.8 / len(by_impl)
            for j, (impl, values) in enumerate(by_impl.items()):
                x = [i + (j - (len(by_impl) - 1) / 2) * width for i in range(len(cases))]
                ax.bar(x, [values.get(c, float("nan")) for c in cases], width, label=impl)
            ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel("TFLOP/s (useful work)" if op == "attention" else "GB/s")
            ax.set_title(f"{op} {dtype} {phase}")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"varlen attention and RoPE: ours and peers ({path.name.removesuffix('-kernels.csv')})")
    return _save(fig, plt, path, out)


# CSV name suffix -> plot function, for plotting a whole results folder
PLOTS = {
    "-encoder.csv": plot_encoder,
    "-strategies.csv": plot_strategies,
    "-packing.csv": plot_packing,
    "-kernels.csv": plot_kernels,
}


def plot_folder(folder: str | Path) -> tuple[list[Path], list[str]]:
    """A ``.png`` beside every results CSV in ``folder`` that has a plot (see :data:`PLOTS`). Returns the
    files written and, for each CSV with nothing to plot (e.g. rows of an older schema), why."""
    written, skipped = [], []
    for path in sorted(Path(folder).glob("*.csv")):
        for suffix, plot in PLOTS.items():
            if path.name.endswith(suffix):
                try:
                    written.append(plot(path))
                except ValueError as e:
                    skipped.append(str(e))
    return written, skipped


__all__ = [
    "PLOTS",
    "encoder_ratios",
    "kernel_rates",
    "packing_fractions",
    "plot_encoder",
    "plot_folder",
    "plot_kernels",
    "plot_packing",
    "plot_strategies",
    "pyplot",
    "strategy_values",
]
