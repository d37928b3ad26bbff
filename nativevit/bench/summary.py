"""A markdown summary of a results folder: the encoder and kernel CSVs of one machine, and the steps of
the run that wrote them (``benchmarks/gpu_suite.sh`` writes ``steps.tsv``: name, status, seconds).

    python -m nativevit.bench.summary benchmarks/results/nvidia-h200 > summary.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .results import parse_shape, read_csv


def _fmt(value: float, unit: str = "") -> str:
    if unit == "s":
        return f"{1e3 * value:.2f} ms"
    if unit == "B":
        return f"{value / 2**20:.0f} MiB"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.4g}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows
    ]


def _newest(rows: list[dict[str, str]]) -> dict[tuple[str, str, str, str, str], dict[str, str]]:
    """``(benchmark, backend, dtype, shape, metric) -> row``, the last written winning."""
    return {(r["benchmark"], r["backend"], r["dtype"], r["shape"], r["metric"]): r for r in rows}


def steps_section(path: Path) -> list[str]:
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return ["## Steps", "", *_table(["step", "status", "seconds"], rows), ""]


def encoder_section(path: Path) -> list[str]:
    rows = _newest(read_csv(path))
    out = ["## Encoder: packed vs padded (vs transformers, compiled)", ""]
    sets = list(dict.fromkeys((k[2], k[3]) for k in rows if k[0] == "encoder" and k[4] == "latency"))
    for dtype, where in sets:
        fields = parse_shape(where)
        if fields.get("set") == "compile-warmup":
            continue
        out.append(
            f"**{fields.get('set')}** ({dtype}, {fields.get('model')}, depth {fields.get('depth')}, "
            f"{fields.get('tokens')} patch tokens)"
        )
        out.append("")
        modes = [k[1] for k in rows if k[2:4] == (dtype, where) and k[4] == "latency"]
        table = []
        for mode in modes:

            def get(metric, mode=mode, dtype=dtype, where=where):
                r = rows.get(("encoder", mode, dtype, where, metric))
                return _fmt(float(r["value"]), r["unit"]) if r else "-"

            mm = rows.get(("encoder", mode, dtype, where, "mm_fraction"))
            table.append(
                [
                    mode,
                    get("latency"),
                    get("tokens_per_s"),
                    f"{100 * float(mm['value']):.0f}%" if mm else "-",
                    get("peak_memory"),
                    get("recompiles") if mode.startswith("compiled") else "",
                ]
            )
        out += _table(["mode", "latency", "tok/s", "mm %", "peak memory", "recompiles (timed)"], table)
        ratios = [
            f"{k[4]} {_fmt(float(r['value']), 'x')}"
            for k, r in rows.items()
            if k[1] == "ratio" and k[2:4] == (dtype, where)
        ]
        out += ["", "ratios: " + ", ".join(ratios), ""]
    compile_rows = [(k, r) for k, r in rows.items() if parse_shape(k[3]).get("set") == "compile-warmup"]
    for k, r in compile_rows:
        out.append(f"- compile ({k[2]}, {k[1]}): {k[4]} = {r['value']} {r['unit']}")
    return out + [""]


def kernels_section(path: Path) -> list[str]:
    index: dict[tuple[str, str, str, str, str, str], str] = {}  # (op, impl, dtype, head_dim, set, metric)
    skipped: dict[str, set[tuple[str, str]]] = {}
    for r in read_csv(path):
        fields = parse_shape(r["shape"])
        if r["metric"] == "skipped":
            skipped.setdefault(r["benchmark"], set()).add((r["backend"], r["value"]))
        elif "set" in fields:
            key = (
                r["benchmark"],
                r["backend"],
                r["dtype"],
                fields.get("head_dim", ""),
                fields["set"],
                r["metric"],
            )
            index[key] = r["value"]
    out = ["## Kernels: ours and peers", ""]
    for op in ("attention", "rope"):
        rate, unit = ("tflops", "TFLOP/s") if op == "attention" else ("gbps", "GB/s")
        timed = [k for k in index if k[0] == op and k[5] == "fwd_latency"]
        for dtype, head_dim in dict.fromkeys((k[2], k[3]) for k in timed):
            mine = [k for k in timed if k[2:4] == (dtype, head_dim)]
            cases = list(dict.fromkeys(k[4] for k in mine))
            impls = list(dict.fromkeys(k[1] for k in mine))
            out += [
                f"**{op} {dtype} head dim {head_dim}**: fwd / bwd {unit} (max error of the forward vs fp64)",
                "",
            ]
            table = []
            for impl in impls:
                cells = [impl]
                for case in cases:
                    at = (op, impl, dtype, head_dim, case)
                    parts = [index.get((*at, f"{phase}_{rate}")) for phase in ("fwd", "bwd")]
                    err = index.get((*at, "fwd_max_err"))
                    text = " / ".join(f"{float(v):.3g}" if v is not None else "-" for v in parts)
                    cells.append(text + (f" ({float(err):.0e})" if err is not None else ""))
                table.append(cells)
            out += _table(["impl", *cases], table) + [""]
        if skipped.get(op):
            out += [f"{op}, not run or failed:", ""]
            out += [f"- `{name}`: {why}" for name, why in sorted(skipped[op])]
            out.append("")
    return out


def summary(folder: str | Path) -> str:
    """The markdown summary of ``folder`` (its ``*-encoder.csv``, ``*-kernels.csv``, ``steps.tsv``, PNGs)."""
    folder = Path(folder)
    csvs = sorted(folder.glob("*.csv"))
    stamp = read_csv(csvs[0])[0] if csvs and read_csv(csvs[0]) else {}
    lines = [
        f"# nativevit results: {stamp.get('hardware', folder.name)}",
        "",
        f"torch {stamp.get('torch', '?')}, triton {stamp.get('triton', '?')}, "
        f"commit {stamp.get('git_sha', '?')}, {stamp.get('timestamp', '?')}",
        "",
    ]
    lines += steps_section(folder / "steps.tsv")
    for path in csvs:
        if path.name.endswith("-encoder.csv"):
            lines += encoder_section(path)
        elif path.name.endswith("-kernels.csv"):
            lines += kernels_section(path)
    pngs = sorted(folder.glob("*.png"))
    if pngs:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        p.error(f"no folder {str(args.folder)!r}")
    sys.stdout.write(summary(args.folder) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
