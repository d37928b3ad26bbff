"""The one CSV schema of every benchmark, its writer and reader, and where results go.

Columns (:data:`CSV_COLUMNS`)::

    benchmark, backend, dtype, shape, metric, value, unit, hardware, torch, triton, git_sha, timestamp

A row says: in ``benchmark``, ``backend`` (what ran, e.g. ``packed:cpu``, ``padded:padded``, or
``ratio`` for a ratio between two of them) at ``dtype`` (a name of ``env.DTYPES``) on ``shape``
(``key=value`` pairs joined by ``;``, see :func:`shape`) measured ``metric`` = ``value`` ``unit``.
The last five columns stamp where and when: hardware tag, torch and triton versions, source commit,
UTC time. Files are named ``<hardware>-<benchmark>.csv`` and written only under the directory the
caller names (``--out``; default :data:`DEFAULT_OUT`, relative to the current directory).
"""

from __future__ import annotations

import csv
import datetime as _dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .env import git_sha, hardware_name, versions

CSV_COLUMNS = (
    "benchmark",
    "backend",
    "dtype",
    "shape",
    "metric",
    "value",
    "unit",
    "hardware",
    "torch",
    "triton",
    "git_sha",
    "timestamp",
)
ROW_FIELDS = CSV_COLUMNS[:7]
STAMP_FIELDS = CSV_COLUMNS[7:]

DEFAULT_OUT = Path("nativevit-results")


@dataclass(frozen=True)
class Row:
    """One measurement (the schema's first seven columns); ``value`` is a number or a short string."""

    benchmark: str
    backend: str
    dtype: str
    shape: str
    metric: str
    value: float | int | str
    unit: str = ""

    def as_dict(self) -> dict[str, str]:
        d = asdict(self)
        d["value"] = format_value(self.value)
        return d


def format_value(value: float | int | str) -> str:
    """Integers exactly, floats to 6 significant digits, strings as they are."""
    if isinstance(value, bool):
        raise TypeError("a benchmark value must be a number or a string, got a bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def shape(**fields: object) -> str:
    """The ``shape`` column: ``shape(set="seed", depth=2)`` -> ``"set=seed;depth=2"``; None fields are
    left out."""
    for k, v in fields.items():
        if v is not None and (";" in str(v) or "=" in str(v)):
            raise ValueError(f"shape field {k}={v!r} may not contain ';' or '='")
    return ";".join(f"{k}={v}" for k, v in fields.items() if v is not None)


def parse_shape(text: str) -> dict[str, str]:
    """Inverse of :func:`shape` (values come back as strings; a field without ``=`` maps to ``""``)."""
    out = {}
    for part in filter(None, text.split(";")):
        key, _, value = part.partition("=")
        out[key] = value
    return out


def roofline_row(benchmark: str, dtype: str, peak_flops: float) -> Row:
    """The ``torch.mm`` roofline of a run, as every benchmark records it."""
    from .measure import MM_SIZE

    return Row(benchmark, "torch.mm", dtype, shape(mm=f"{MM_SIZE}^3"), "mm_peak", peak_flops / 1e9, "GFLOP/s")


def results_path(out: str | Path, benchmark: str, device: torch.device | str = "cpu") -> Path:
    """``<out>/<hardware>-<benchmark>.csv``."""
    return Path(out) / f"{hardware_name(device)}-{benchmark}.csv"


def stamp(device: torch.device | str = "cpu") -> dict[str, str]:
    """The last five columns for a run on ``device``: hardware, versions, source commit, UTC time."""
    return {
        "hardware": hardware_name(device),
        **versions(),
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_csv(path: str | Path, rows: Iterable[Row], *, device: torch.device | str = "cpu") -> Path:
    """Append ``rows`` to the CSV at ``path`` (created with its header, parent folders too), each
    stamped for ``device``. An existing file must have this schema's header. Returns ``path``."""
    path = Path(path)
    rows = list(rows)
    for r in rows:
        if not isinstance(r, Row):
            raise TypeError(f"write_csv takes Row records, got {type(r).__name__}")
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{path} has columns {header}, not the benchmark schema {list(CSV_COLUMNS)}")
        new = header is None
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = True
    extra = stamp(device)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**r.as_dict(), **extra})
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Every row of a results CSV as a dict of the schema's columns (values as written: strings)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path} has columns {reader.fieldnames}, not the schema {list(CSV_COLUMNS)}")
        return list(reader)


def latest(rows: Iterable[dict[str, str]], benchmark: str) -> dict[tuple[str, str, str, str], float]:
    """``(backend, dtype, shape, metric) -> value`` of ``benchmark``'s rows, the last written winning."""
    out: dict[tuple[str, str, str, str], float] = {}
    for row in rows:
        if row["benchmark"] == benchmark:
            try:
                out[(row["backend"], row["dtype"], row["shape"], row["metric"])] = float(row["value"])
            except ValueError:
                continue
    return out


__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_OUT",
    "ROW_FIELDS",
    "STAMP_FIELDS",
    "Row",
    "format_value",
    "latest",
    "parse_shape",
    "read_csv",
    "results_path",
    "roofline_row",
    "shape",
    "stamp",
    "write_csv",
]
