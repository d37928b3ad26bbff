"""Benchmarks: what ``nativevit bench`` and ``benchmarks/bench_*.py`` run.

* ``env``: device and dtype table (:data:`DTYPES`), hardware name, versions.
* ``images``: the built-in image sets, their segment lengths, the ``--images`` inputs (sets, folders,
  files) and the kernel benchmarks' mixed batch.
* ``measure``: interleaved timing rounds (:func:`measure`), peak memory, the ``torch.mm`` roofline.
* ``results``: the one CSV schema (:data:`CSV_COLUMNS`), its writer and reader; results go under
  the folder the caller names, never into the installed package.
* ``flops``: FLOPs and bytes of single ops, and the FLOP model split per module (whole encoders:
  ``NativeViT.flops_per_batch``).
* ``encoder``: packed vs padded (vs transformers, vs compiled) encoder, the main job.
* ``kernels`` + ``peers``: attention and RoPE through our backends and the peers' (``nativevit kernels``);
  ``profile``: ``nativevit profile``;  ``packing``: padding of the ways of batching;
  ``strategies``: encoder cost of the resolution strategies;  ``window``: Qwen2.5-VL window attention;
  ``vs_timm``: against timm's NaFlexViT;  ``plot``: figures from the CSVs;  ``summary``: a markdown
  summary of a results folder.
* ``args``: argument types, ``--out``, ``--model``/``--checkpoint``, ``--images``, the one-line error
  boundary of the command line.

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
