"""Triton kernels of nativevit, installed as ``nativevit.kernels`` (one op per file, each with its reference).

* ``rope2d``: fused 2D RoPE of q and k.
* ``varlen_attention``: block-diagonal varlen flash attention, forward and backward.

Importing a kernel module needs triton. The ``triton`` backend that puts them behind the public ops
is ``nativevit.backends.triton``; these modules import only the registry and the references.
"""
