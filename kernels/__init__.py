"""Triton kernels of nativevit, installed as ``nativevit.kernels`` (one op per file, each with its reference)."""
