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


__all__ = ["encoder_ratios", "plot_encoder", "pyplot"]
