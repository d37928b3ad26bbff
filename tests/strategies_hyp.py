"""Hypothesis settings and strategies shared by the property tests (tests/test_properties.py).

Reproducible by default: the profile ``nativevit-ci`` is derandomized (the examples are a function of
the test's name and its strategies, the same on every machine and run) and keeps no example database.
Each test bounds its own ``max_examples`` so the suite stays fast on a 2-core CPU; set
``NATIVEVIT_HYPOTHESIS_SCALE`` (e.g. ``10``) to run proportionally more examples locally, and
``NATIVEVIT_HYPOTHESIS_RANDOM=1`` to draw fresh random examples instead of the fixed ones, and
``NATIVEVIT_HYPOTHESIS_NO_SHRINK=1`` to report a failure as found, without minimising it (faster).

The profile is registered, not loaded: it applies to the tests that use :func:`examples`, never to
other hypothesis tests of the suite.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

PROFILE = "nativevit-ci"
settings.register_profile(
    PROFILE,
    derandomize=os.environ.get("NATIVEVIT_HYPOTHESIS_RANDOM", "0") in ("", "0"),
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=(
        [Phase.explicit, Phase.generate]
        if os.environ.get("NATIVEVIT_HYPOTHESIS_NO_SHRINK", "0") not in ("", "0")
        else list(Phase)
    ),
)
_SCALE = float(os.environ.get("NATIVEVIT_HYPOTHESIS_SCALE", "1"))


def examples(n: int) -> settings:
    """The CI profile with ``n`` examples (times ``NATIVEVIT_HYPOTHESIS_SCALE``)."""
    return settings(settings.get_profile(PROFILE), max_examples=max(1, round(n * _SCALE)))


# ------------------------------------------------------------------ segment layouts


@st.composite
def skew_layout(draw, max_long: int = 96, max_tiny: int = 300, max_tiny_tokens: int = 360) -> tuple[int, ...]:
    """One long segment among many tiny ones (0..3 tokens): a repeated motif, the long one anywhere."""
    long = draw(st.integers(1, max_long))
    motif = draw(st.lists(st.integers(0, 3), min_size=1, max_size=8))
    # at most max_tiny segments and max_tiny_tokens tokens of them
    reps = draw(st.integers(1, max(1, min(max_tiny // len(motif), max_tiny_tokens // max(1, sum(motif))))))
    tiny = motif * reps
    at = draw(st.integers(0, len(tiny)))
    return (*tiny[:at], long, *tiny[at:])


@st.composite
def segment_layouts(
    draw, *, max_len: int = 100, max_segments: int = 10, max_long: int = 80, max_tiny: int = 300
) -> tuple[int, ...]:
    """Segment lengths of one packed batch, at least one segment: a few mixed lengths (0- and 1-token
    segments among them), one long among up to a few hundred tiny ones, a few hundred tiny ones, and
    (rarer) edge cases: all empty, one token, ``max_len`` alone, all one-token."""
    kind = draw(st.sampled_from(("mixed", "skew", "mixed", "skew", "many-tiny", "edge")))  # weighted
    if kind == "mixed":
        return tuple(draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_segments)))
    if kind == "skew":
        return draw(skew_layout(max_long=max_long, max_tiny=max_tiny))
    if kind == "many-tiny":
        motif = draw(st.lists(st.integers(0, 2), min_size=1, max_size=8))
        return tuple(motif * draw(st.integers(1, max(1, max_tiny // len(motif)))))  # <= 2 * max_tiny tokens
    return draw(st.sampled_from([(0,), (0, 0, 0), (1,), (0, 1, 0), (max_len,), (1,) * 24]))


def small_segment_layouts(max_len: int = 40, max_segments: int = 6) -> st.SearchStrategy[tuple[int, ...]]:
    """Small layouts (the Triton interpreter pays per program): still 0/1-token segments and skew."""
    return st.one_of(
        st.lists(st.integers(0, max_len), min_size=1, max_size=max_segments).map(tuple),
        skew_layout(max_long=max_len, max_tiny=12),
    )


# How q, k, v and cu_seqlens are laid out in memory.
CU_FORMS = ("segments", "contiguous", "strided")


def strided_cu_seqlens(cu: torch.Tensor) -> torch.Tensor:
    """The same int32 offsets as a non-contiguous view (stride 2, storage offset 1) of a larger buffer
    whose other entries are garbage."""
    buf = torch.full((2 * cu.numel() + 1,), -7, dtype=torch.int32, device=cu.device)
    buf[1::2] = cu
    view = buf[1::2]
    assert not view.is_contiguous() and view.storage_offset() == 1 and view.stride() == (2,)
    return view


# ------------------------------------------------------------------ grids of images


def grids(
    max_side: int = 12, min_images: int = 1, max_images: int = 5
) -> st.SearchStrategy[list[tuple[int, int, int]]]:
    """Lists of ``(t, h, w)`` patch grids: t in 1..2, h and w even in 2..max_side."""
    side = st.integers(1, max_side // 2).map(lambda n: 2 * n)
    return st.lists(st.tuples(st.integers(1, 2), side, side), min_size=min_images, max_size=max_images)


# ------------------------------------------------------------------ images

# Every PIL mode both processors take; "P+t" is a palette image with a transparency index.
PIL_MODES = ("RGB", "L", "RGBA", "LA", "P", "P+t", "1", "I", "F", "I;16", "CMYK")


@st.composite
def image_sizes(draw) -> tuple[int, int]:
    """``(height, width)`` in 1..300, often extreme: a side of 1..3 against one up to 300 (aspect
    ratios around Qwen2-VL's limit of 200, on both sides of it), tiny, or a side on a rounding tie."""
    kind = draw(st.sampled_from(["any", "thin", "tiny", "half-way"]))
    if kind == "any":
        hw = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    elif kind == "half-way":  # a side of 28k + 14 px: smart_resize's rounding ties (half to even)
        hw = (28 * draw(st.integers(0, 10)) + 14, draw(st.integers(1, 300)))
    elif kind == "thin":
        short = draw(st.integers(1, 3))
        near_limit = st.integers(195 * short, 205 * short).filter(lambda n: n <= 300)
        long = draw(st.one_of(st.integers(150, 300), near_limit))
        hw = (short, long)
    else:
        hw = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return hw if draw(st.booleans()) else hw[::-1]


@st.composite
def image_specs(draw) -> dict:
    """One input image: how it is given (PIL image or uint8 HWC RGB array), its mode, size, seed."""
    h, w = draw(image_sizes())
    kind = draw(st.sampled_from(["pil", "pil", "array"]))
    mode = draw(st.sampled_from(PIL_MODES)) if kind == "pil" else "RGB"
    return dict(kind=kind, mode=mode, h=h, w=w, seed=draw(st.integers(0, 2**16)))
