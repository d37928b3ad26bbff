"""Benchmarks: what ``nativevit bench`` and ``benchmarks/bench_*.py`` run.

* ``env``: device and dtype table (:data:`DTYPES`), hardware name, versions.
* ``images``: the built-in image sets and the kernel benchmarks' mixed batch.
* ``measure``: interleaved timing rounds (:func:`measure`), peak memory, the ``torch.mm`` roofline.
* ``results``: the one CSV schema (:data:`CSV_COLUMNS`), its writer and reader; results go under
  the folder the caller names, never into the installed package.
* ``flops``: FLOPs and bytes of single ops (whole encoders: ``NativeViT.flops_per_batch``).
* ``encoder``: packed vs padded (vs transformers) encoder, the main job.
* ``kernels``: attention and RoPE backends;  ``window``: Qwen2.5-VL window attention;
  ``vs_timm``: against timm's NaFlexViT;  ``plot``: figures from the CSVs.
* ``args``: argument types, ``--out``, the one-line error boundary of the command line.

The benchmark modules import their heavy dependencies (timm, transformers, matplotlib) only when run.
"""

from .env import DTYPES, dtype_name, hardware_name
from .flops import attention_flops
from .images import IMAGE_SETS, KERNEL_MIX, image_set, synthetic_image
from .measure import Case, Timing, measure, mm_peak_flops, time_fn
from .results import CSV_COLUMNS, DEFAULT_OUT, Row, read_csv, results_path, shape, write_csv

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_OUT",
    "DTYPES",
    "IMAGE_SETS",
    "KERNEL_MIX",
    "Case",
    "Row",
    "Timing",
    "attention_flops",
    "dtype_name",
    "hardware_name",
    "image_set",
    "measure",
    "mm_peak_flops",
    "read_csv",
    "results_path",
    "shape",
    "synthetic_image",
    "time_fn",
    "write_csv",
]
