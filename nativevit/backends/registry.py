"""The backend registry: which implementations of each op exist, where they run, what they refuse.

A backend is a record (:class:`Backend`); kernel packages register theirs here at import time, whether
or not they can run on this machine (``unavailable`` then says why, so an explicit request explains
itself). The public ops (``nativevit.ops``) validate their inputs once and then call
:func:`resolve_backend`; backends never re-validate what the public op already checked, they only
declare what they refuse (``rejects``: a dtype, a head dim).

This module imports nothing of nativevit: kernel adapters import it, never the public ops module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

OPS = ("attention", "rope")


def _runs_anywhere(device_type: str) -> str | None:
    return None


def _takes_anything(x: torch.Tensor) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``fn`` takes ``(q, k, v, segments, scale)`` for attention (``segments``: the batch's
    ``nativevit.packing.Segments``) and ``(q, k, cos, sin)`` for rope, on inputs the public op has
    validated. ``unavailable(device_type)`` returns why the backend cannot run on that device type
    ("cpu", "cuda"), or None. ``rejects(x)`` returns why it cannot take this input (``x`` is q), or None.
    ``auto=False`` keeps a backend out of automatic selection (the padded baseline).
    ``prepare(segments, x)``, when set, builds what ``fn`` will need for these segments (e.g. a kernel's
    work list, kept in ``segments.cached``); a batch's plan calls it eagerly, so compiled code only reads.
    """

    name: str
    fn: Callable
    unavailable: Callable[[str], str | None] = _runs_anywhere
    rejects: Callable[[torch.Tensor], str | None] = _takes_anything
    auto: bool = True
    prepare: Callable[[Any, torch.Tensor], None] | None = None


_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}

# Fastest first, per device type. ``auto`` never picks ``padded`` (a baseline) or interpreted Triton.
AUTO_ORDER = {
    "attention": {"cuda": ("flash_attn", "triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    "rope": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
}


def _check_op(op: str) -> None:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_REGISTRY)}")


def register_backend(op: str, backend: Backend) -> None:
    """Add (or replace) a backend of ``op`` ("attention" or "rope")."""
    _check_op(op)
    _REGISTRY[op][backend.name] = backend


def backends(op: str) -> dict[str, Backend]:
    """The registered backends of ``op`` by name (a copy: registering goes through register_backend)."""
    _check_op(op)
    return dict(_REGISTRY[op])


def check_backend_name(op: str, name: str) -> str:
    """``name`` if it is "auto" or a registered backend of ``op``, else a ``ValueError`` listing them."""
    known = set(backends(op)) | {"auto"}
    if name not in known:
        raise ValueError(f"unknown {op} backend {name!r}; known: {sorted(known)}")
    return name


def triton_interpreted() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_types(device: torch.device | str | None) -> list[str]:
    if device is not None:
        return [torch.device(device).type]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backend_status(device: torch.device | str | None = None) -> dict[str, dict[str, str | None]]:
    """Every registered backend of each op and why it cannot run on ``device`` (None: it can).

    ``device`` None means this machine: a backend counts as runnable if any local device type can run it.
    """
    types = _device_types(device)
    status: dict[str, dict[str, str | None]] = {}
    for op, table in _REGISTRY.items():
        status[op] = {}
        for name, b in table.items():
            reasons = [b.unavailable(dt) for dt in types]
            status[op][name] = None if any(r is None for r in reasons) else reasons[0]
    return status


def available_backends(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """Backends of each op that can run on ``device`` (default: this machine, any device)."""
    return {
        op: [n for n, why in table.items() if why is None] for op, table in backend_status(device).items()
    }


def resolve_backend(op: str, backend: str, x: torch.Tensor) -> Backend:
    """The backend that will run ``op`` on tensors like ``x`` (``backend``: a name or "auto").

    "auto" takes the first entry of ``AUTO_ORDER`` that can run on ``x``'s device and accepts ``x``,
    else ``torch``. A named backend that cannot run raises ``RuntimeError`` saying why; an unknown
    name raises ``ValueError`` listing the known ones.
    """
    _check_op(op)
    table = _REGISTRY[op]
    device_type = x.device.type
    if backend == "auto":
        for name in AUTO_ORDER[op].get(device_type, ()):
            b = table.get(name)
            if b is not None and b.auto and b.unavailable(device_type) is None and b.rejects(x) is None:
                return b
        return table["torch"]
    b = table.get(backend)
    if b is None:
        raise ValueError(f"unknown {op} backend {backend!r}; known: {sorted(table)} (or 'auto')")
    why = b.unavailable(device_type) or b.rejects(x)
    if why is not None:
        raise RuntimeError(f"{op} backend {backend!r} cannot run on {device_type} tensors: {why}")
    return b
