"""Backends of the public ops (``nativevit.ops``), one module each, all registered in ``registry``.

* ``registry``: the records, resolution (``auto``), ``available_backends()``, ``backend_status()``.
* ``reference``: ``torch`` (the reference) and ``padded`` (the baseline), plain torch.
* ``cpp``: ``cpu`` and ``cuda``, the C++/CUDA kernels of ``nativevit._C`` (built from ``csrc/``).
* ``triton``: the Triton kernels of ``nativevit.kernels`` (top-level ``kernels/`` in the repository).
* ``flash_attn``: ``flash_attn_varlen_func`` when installed.

Importing this package registers all of them; a backend whose code cannot load here is still
registered, and its ``unavailable`` says why.
"""

from . import cpp, flash_attn, reference, triton  # noqa: F401  (registration)
from .registry import (
    Backend,
    available_backends,
    backend_status,
    backends,
    register_backend,
    resolve_backend,
    triton_interpreted,
)

__all__ = [
    "Backend",
    "available_backends",
    "backend_status",
    "backends",
    "register_backend",
    "resolve_backend",
    "triton_interpreted",
]
