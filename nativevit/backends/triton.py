"""The ``triton`` backend: the Triton kernels of ``nativevit.kernels`` (``kernels/`` in the repository).

Available on CUDA devices, and on CPU only when ``TRITON_INTERPRET=1`` was set before triton was
imported (tests); ``auto`` never picks the interpreter. Without triton the backend is still
registered and an explicit request says why it cannot run.

The kernels are registered as ``torch.library`` custom ops in the ``nativevit`` namespace, prefixed
``triton_`` (``triton_rope2d``, ``triton_rope2d_``, ``triton_varlen_attention_fwd``,
``triton_varlen_attention_bwd``) beside the C++ ops (``cpp_*``, ``nativevit.backends.cpp``).

The attention kernels launch one program per block of every segment, from work lists built on the
host per batch; the backend's ``prepare`` builds them eagerly (a model's plan calls it), so code
compiled by ``torch.compile`` only reads them.
"""

from __future__ import annotations

import torch

from .registry import Backend, register_backend, triton_interpreted

try:
    import triton  # noqa: F401
except ImportError as e:
    _IMPORT_ERROR: str | None = f"triton cannot be imported ({e})"
else:
    _IMPORT_ERROR = None
    from ..kernels import rope2d, varlen_attention


def _unavailable(device_type: str) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if varlen_attention.INTERPRETED:
            return None
        if triton_interpreted():
            return "TRITON_INTERPRET=1 was set after triton was imported; set it before importing nativevit"
        return "triton kernels run on CPU only under the interpreter (TRITON_INTERPRET=1, set before import)"
    return f"triton kernels do not run on {device_type} devices"


def _missing(*args, **kwargs):
    raise RuntimeError(_IMPORT_ERROR)


if _IMPORT_ERROR is None:
    register_backend(
        "attention",
        Backend(
            "triton",
            varlen_attention.varlen_attention,
            _unavailable,
            varlen_attention.varlen_attention_rejects,
            prepare=varlen_attention.varlen_attention_prepare,
        ),
    )
    register_backend("rope", Backend("triton", rope2d.rope2d, _unavailable, rope2d.rope2d_rejects))
else:
    register_backend("attention", Backend("triton", _missing, _unavailable))
    register_backend("rope", Backend("triton", _missing, _unavailable))
