"""Plots from the CSV results under ``benchmarks/results/`` (the newest run of each case wins).

python benchmarks/plot_results.py            # writes benchmarks/results/<hardware>-encoder.png etc.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def latest(path: Path, benchmark: str) -> dict[tuple[str, str, str, str], float]:
    """(backend, dtype, shape, metric) -> value of the newest row of ``benchmark``."""
    out: dict[tuple[str, str, str, str], float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["benchmark"] == benchmark:
                out[(row["backend"], row["dtype"], row["shape"], row["metric"])] = float(row["value"])
    return out


def plot_encoder(path: Path) -> Path:
    """Per image set: measured packed/padded speedup next to the work ratio, one panel per dtype."""
    data = latest(path, "encoder")
    dtypes = sorted({k[1] for k in data if k[0] == "ratio"})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        shapes = [k[2] for k in data if k[0] == "ratio" and k[1] == dtype and k[3] == "work_ratio"]
        labels = [s.split(";")[0].removeprefix("set=") for s in shapes]
        work = [data[("ratio", dtype, s, "work_ratio")] for s in shapes]
        speed = [data[("ratio", dtype, s, "speedup")] for s in shapes]
        x = range(len(shapes))
        ax.bar([i - 0.2 for i in x], work, 0.4, label="work ratio (padded / packed FLOPs)", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], speed, 0.4, label="measured speedup packed vs padded", color="#1f77b4")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels, rotation=30, ha="right")
        ax.set_title(f"{dtype}")
        ax.set_ylabel("x (log scale)")
        ax.legend(fontsize=8)
    hardware = path.name.removesuffix("-encoder.csv")
    fig.suptitle(f"nativevit packed vs padded encoder ({hardware})")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    for path in sorted(args.results.glob("*-encoder.csv")):
        print("wrote", plot_encoder(path))


if __name__ == "__main__":
    main()
