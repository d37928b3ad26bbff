"""Build script for nativevit.

The pure-PyTorch package ``nativevit`` and the Triton kernels in ``kernels/`` (installed as the
subpackage ``nativevit.kernels``; the top-level name ``kernels`` belongs to another project), plus the
extension ``nativevit._C`` built from ``csrc/``:

* the op schemas and the C++ CPU kernels (``csrc/ops.cpp``, ``csrc/checks.cpp``, ``csrc/cpu/``), always
  (when torch is importable at build time: install with ``pip install --no-build-isolation -e .``
  after torch);
* the CUDA kernels (``csrc/cuda/``) when torch has CUDA and a CUDA toolkit is found.

Environment switches:

* ``NATIVEVIT_SKIP_CUDA=1``: build the CPU kernels only.
* ``NATIVEVIT_CUDA_ARCHS``: ``;``-separated compute capabilities, default ``80;90`` (SASS for each,
  plus PTX for the newest so newer GPUs can JIT it).
* ``CUDA_HOME``: toolkit root. Otherwise found from the ``nvcc`` on PATH, following symlinks and
  wrapper scripts that ``exec`` the real compiler (torch's own guess, the parent of the ``nvcc`` it
  finds, is wrong for such wrappers and the link then fails with "cannot find -lcudart").
* ``MAX_JOBS``: parallel ninja jobs (torch's convention).

CPU code is compiled for the baseline x86-64 ISA (no ``-march=native``: the wheel must run on any
x86-64 CPU); the AVX-512 / AVX-512-BF16 kernels are compiled per function with ``target``
attributes and picked at run time from CPUID, so one build serves every CPU.
"""

import os
import re
import shutil
import warnings
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _is_cuda_root(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: ``CUDA_HOME``/``CUDA_PATH`` if set, else behind the ``nvcc`` on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent)
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            head = real.read_bytes()[:4096]
            if head.startswith(b"#!"):
                candidates += [
                    Path(m).parent.parent
                    for m in re.findall(r"(/\S+/bin/nvcc)\b", head.decode(errors="replace"))
                ]
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    return next((str(c.resolve()) for c in candidates if _is_cuda_root(c)), None)


def _cuda_gencode_flags() -> list[str]:
    archs = [
        a.strip().replace(".", "")
        for a in os.environ.get("NATIVEVIT_CUDA_ARCHS", "80;90").split(";")
        if a.strip()
    ]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(
            f"NATIVEVIT_CUDA_ARCHS must look like '80;90', got {os.environ['NATIVEVIT_CUDA_ARCHS']!r}"
        )
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def _sources(folder: str, *patterns: str) -> list[str]:
    """Files of ``folder`` matching ``patterns``, relative to this directory, sorted."""
    return sorted(str(p.relative_to(HERE)) for pat in patterns for p in (HERE / folder).glob(pat))


def extension_modules() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for ``nativevit._C``; empty (with a warning) when nothing can be built."""
    cuda_home = None
    if os.environ.get("NATIVEVIT_SKIP_CUDA", "0") in ("", "0"):
        cuda_home = find_cuda_home()
        if cuda_home:
            # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported
            os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn(
            "torch is not importable at build time, so nativevit._C (the C++/CUDA kernels) is not built; "
            "the pure-PyTorch and Triton backends still work. Install torch first, then "
            "`pip install --no-build-isolation -e .` to build the kernels.",
            stacklevel=1,
        )
        return [], {}
    # csrc/ops.cpp: schemas + CPU registration; checks.cpp: the bounds checks CPU and CUDA share
    sources = ["csrc/ops.cpp", "csrc/checks.cpp", *_sources("csrc/cpu", "*.cpp")]
    # -fopenmp: at::parallel_for's `omp parallel` lives in torch's headers, so without it every
    # parallel_for in csrc/ runs on one thread
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    kwargs = dict(extra_link_args=["-fopenmp"])
    with_cuda = False
    if os.environ.get("NATIVEVIT_SKIP_CUDA", "0") not in ("", "0"):
        warnings.warn("NATIVEVIT_SKIP_CUDA is set: building nativevit._C without CUDA kernels", stacklevel=1)
    elif torch.version.cuda is None:
        warnings.warn("torch has no CUDA support: building nativevit._C without CUDA kernels", stacklevel=1)
    elif cuda_home is None:
        warnings.warn(
            "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH): building nativevit._C without "
            "CUDA kernels",
            stacklevel=1,
        )
    else:
        with_cuda = True
    if with_cuda:
        # .cu: kernels and plain launchers (CUDA headers only); .cpp: CUDA registration and backward
        sources += _sources("csrc/cuda", "*.cu", "*.cpp")
        nvcc_flags = ["-O3", "-lineinfo", *_cuda_gencode_flags()]
        if os.environ.get("NVCC_THREADS"):
            nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
        ext = CUDAExtension(
            "nativevit._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **kwargs,
        )
    else:
        ext = CppExtension("nativevit._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    name="nativevit",
    version="0.1.0",
    description="Native-resolution ViT encoder: packed varlen batches, fused 2D RoPE, varlen attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["nativevit", "nativevit.*"]), "nativevit.kernels"],
    package_dir={"nativevit": "nativevit", "nativevit.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "triton",
        "einops",
        "timm",
        "numpy",
        "pillow",
        "safetensors",
        "tqdm",
        "pyarrow",
        "webdataset",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers>=5.23,<6"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["nativevit = nativevit.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
