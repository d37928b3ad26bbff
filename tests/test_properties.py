"""Property-based tests (hypothesis): random inputs against independent references.

1. ``varlen_attention`` and ``apply_rope_2d``: random segment layouts (0- and 1-token segments, a few
   hundred segments, one long + many tiny), heads, head dims, dtypes, softmax scales and memory layouts
   (q, k, v as strided views of one fused qkv buffer; ``cu_seqlens`` as ``Segments``, contiguous, or a
   non-contiguous int32 view) through every attention / rope backend that runs on the CPU here, forward
   and backward, against float64 references written here from the definitions, with FlashAttention's
   rule (tests/flash_rule.py). A backend that refuses an input (its ``rejects``) must refuse it
   explicitly, with that reason, when asked for it by name: refused combinations are checked, not skipped.
2. Packing invariance: any order and grouping of images into packed (or padded) batches gives every
   image the output it gets alone, for each tower family (fp64, 1e-12).
3. ``ImageProcessor`` against transformers' ``Qwen2VLImageProcessorPil``: random sizes (1..300 px,
   extreme aspect ratios on both sides of the limit), PIL modes and array inputs: the same grid and
   bit-identical ``pixel_values``, or both refuse.
4. Checkpoints: random tiny configs of every family with random weights (special values included), saved
   with a random shard size, load bit-identical with the same config; a second save into the same
   directory replaces the first.

Examples are derandomized (tests/strategies_hyp.py): the same ones on every run. The whole file runs in
well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import re
import tempfile
from pathlib import Path

import kernel_cases as kc
import numpy as np
import PIL.Image
import pytest
import strategies_hyp as sh
import torch
import torch.nn.functional as F
from flash_rule import ABS_FLOOR, check_rule
from hypothesis import event, example, given
from hypothesis import strategies as st

import nativevit as nv
from nativevit.backends import backends
from nativevit.checkpoint import release_checkpoint_key
from nativevit.packing import pack_by_budget
from nativevit.rope import rope_2d_ref

CPU_BACKENDS = nv.ops.available_backends("cpu")
ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROPE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 72, 80)
FWD, BWD = 2, 3  # FlashAttention's factors


@contextlib.contextmanager
def one_thread():
    """Run the test's own work (references, oracles, file I/O) on one intra-op thread: on a shared
    2-core machine OpenMP regions of tiny ops cost far more than they compute. Code under test keeps
    the suite's thread setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def describe(lengths) -> str:
    head = ", ".join(map(str, lengths[:12])) + (", ..." if len(lengths) > 12 else "")
    return f"{len(lengths)} segments, {sum(lengths)} tokens, max {max(lengths)}: ({head})"


def floor_for(backend: str, dtype: torch.dtype) -> float | None:
    """The floors the kernel tests use: fixed ``ABS_FLOOR`` for the C++ and torch backends, half an
    ulp at the reference's magnitude (``check_rule``'s default, None) for Triton."""
    return None if backend == "triton" else ABS_FLOOR.get(dtype, 0.0)


def assert_refused(op: str, name: str, x: torch.Tensor, call) -> bool:
    """If backend ``name`` of ``op`` rejects ``x``: asking for it by name must raise, saying why."""
    reason = backends(op)[name].rejects(x)
    if reason is None:
        return False
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        call()
    event(f"{op} {name} refuses {x.dtype} d={x.shape[-1]}")
    return True


# ============================================================== 1a. varlen attention


def dense_attention_fp64(q, k, v, lengths, scale):
    """Block-diagonal softmax attention from the definition, in float64: one ``(H, N, N)`` score matrix
    with the keys of other segments masked out. Every query row has at least itself as a key."""
    q, k, v = q.double(), k.double(), v.double()
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    same = seg[:, None] == seg[None, :]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    p = torch.softmax(scores.masked_fill(~same, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def per_segment_sdpa(q, k, v, lengths, scale):
    """The same-precision torch reference: ``scaled_dot_product_attention`` on every segment, the
    segments of one length batched into one call (gathered by index, put back in row order)."""
    starts = [0, *itertools.accumulate(lengths)][:-1]
    outs, rows = [], []
    for n in sorted(set(lengths) - {0}):
        idx = torch.tensor([s for s, m in zip(starts, lengths) if m == n])[:, None] + torch.arange(n)
        qs, ks, vs = (x[idx].transpose(1, 2) for x in (q, k, v))  # (segments, H, n, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).flatten(0, 1))
        rows.append(idx.flatten())
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs)[torch.argsort(torch.cat(rows))]


def forward_backward(fn, qkv: torch.Tensor, dout: torch.Tensor):
    """``(out, dq, dk, dv)`` of ``fn(q, k, v)`` with q, k, v the views ``qkv.unbind(1)`` of a fused
    ``(total, 3, heads, head_dim)`` leaf; no gradients for an empty batch."""
    qkv = qkv.detach().requires_grad_()
    out = fn(*qkv.unbind(1))
    if out.numel() == 0:
        return (out,)
    (grad,) = torch.autograd.grad(out, qkv, dout.to(qkv.dtype))
    return (out, *grad.unbind(1))


def check_attention_backends(
    names, lengths, heads, head_dim, dtype, scale, cu_form, extra_max, seed, *, strict_padded=False
):
    """Each backend of ``names`` on one random input, forward and backward, against the fp64
    reference with FlashAttention's rule; a backend that rejects the input must refuse it by name."""
    total = sum(lengths)
    qkv = kc.fused_qkv(total, heads, head_dim, dtype, seed=seed)
    # rounded to dtype once, so the fp64 reference sees the same output gradient as the kernels
    dout = torch.randn(total, heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    segments = nv.Segments(lengths)
    if cu_form == "segments":
        cu, max_seqlen = segments, None
    else:
        cu = segments.cu_seqlens if cu_form == "contiguous" else sh.strided_cu_seqlens(segments.cu_seqlens)
        max_seqlen = None if extra_max is None else segments.max_seqlen + extra_max
    sc = head_dim**-0.5 if scale is None else scale
    with one_thread():
        same = forward_backward(lambda q, k, v: per_segment_sdpa(q, k, v, lengths, sc), qkv, dout)
        exact = forward_backward(
            lambda q, k, v: dense_attention_fp64(q, k, v, lengths, sc), qkv.double(), dout
        )
    for name in names:

        def kernel(q, k, v, name=name):
            return nv.ops.varlen_attention(q, k, v, cu, max_seqlen, scale=scale, backend=name)

        if assert_refused("attention", name, qkv.unbind(1)[0], lambda: kernel(*qkv.unbind(1))):
            continue
        got = forward_backward(kernel, qkv, dout)
        what = f"{name} {dtype} heads={heads} d={head_dim} scale={scale} cu={cu_form}; {describe(lengths)}"
        assert got[0].shape == (total, heads, head_dim), f"{what}: output shape {tuple(got[0].shape)}"
        for label, a, b, r, factor in zip(("out", "dq", "dk", "dv"), got, same, exact, (FWD, BWD, BWD, BWD)):
            assert a.dtype == dtype, f"{label} of {what} has dtype {a.dtype}"
            floor = floor_for(name, dtype)
            if name == "padded" and dtype == torch.float32 and label != "out" and not strict_padded:
                # known deviation (test_known_deviation_padded_fp32_backward): the rule with a floor
                # raised by 16 ulps of the reference's magnitude, not a skip
                event("known deviation: padded fp32 gradients, floor + 16 ulps")
                floor += 16 * torch.finfo(dtype).eps * (r.abs().max().item() if r.numel() else 0.0)
            check_rule(f"{label} of {what}", a, b, r, factor, floor=floor)


@pytest.mark.xfail(
    strict=True,
    reason="deviation: the padded backend's fp32 gradients miss FlashAttention's rule on one long + many "
    "short segments (dv 2.9e-6 vs 3 x 4.9e-7 + 1e-6): torch's fused CPU SDPA backward with the key-padding "
    "mask (SDPBackend.MATH meets the rule). When resolved, drop this marker and the looser bound in "
    "check_attention_backends.",
)
def test_known_deviation_padded_fp32_backward():
    lengths = (40,) + (3,) * 12
    check_attention_backends(
        ["padded"], lengths, 1, 72, torch.float32, None, "segments", None, 0, strict_padded=True
    )


attention_cases = dict(
    heads=st.integers(1, 3),
    head_dim=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from(ATTN_DTYPES),
    scale=st.one_of(st.none(), st.floats(0.02, 1.0)),
    cu_form=st.sampled_from(sh.CU_FORMS),
    extra_max=st.one_of(st.none(), st.integers(0, 3)),
    seed=st.integers(0, 2**16),
)


@sh.examples(30)
@given(lengths=sh.segment_layouts(), **attention_cases)
@example(kc.LAYOUTS["zero-one-long"][:4], 1, 80, torch.bfloat16, None, "strided", 0, 0)
@example(kc.LAYOUTS["skew"], 1, 72, torch.float16, 0.3, "strided", None, 1)
@example(kc.LAYOUTS["120-segments"], 2, 64, torch.float32, None, "segments", None, 2)
@example((0, 1, 3, 2) * 20 + (90,) + (1, 0) * 30, 2, 72, torch.float32, None, "strided", None, 3)
def test_attention_backends_match_fp64(lengths, heads, head_dim, dtype, scale, cu_form, extra_max, seed):
    """Every CPU attention backend but Triton (next test: the interpreter needs small shapes), forward
    and backward, against dense fp64 attention, with FlashAttention's rule."""
    names = [b for b in CPU_BACKENDS["attention"] if b != "triton"]
    assert {"cpu", "torch", "padded"} <= set(names), CPU_BACKENDS
    check_attention_backends(names, lengths, heads, head_dim, dtype, scale, cu_form, extra_max, seed)


@sh.examples(3)
@given(
    lengths=sh.small_segment_layouts(max_len=32, max_segments=5),
    **{**attention_cases, "heads": st.integers(1, 2), "head_dim": st.sampled_from((16, 32, 72, 80))},
)
@example((37, 0, 1, 9), 1, 80, torch.bfloat16, None, "strided", 0, 0)
def test_triton_attention_matches_fp64(lengths, heads, head_dim, dtype, scale, cu_form, extra_max, seed):
    if "triton" not in CPU_BACKENDS["attention"]:
        pytest.skip(f"triton attention does not run on the CPU here: {nv.ops.backend_status('cpu')}")
    check_attention_backends(["triton"], lengths, heads, head_dim, dtype, scale, cu_form, extra_max, seed)


# ============================================================== 1b. 2D rope


def rope_views(total, heads, head_dim, dtype, form, buf_seed):
    """``(total, heads, head_dim)`` in ``dtype`` laid out as ``form`` -- a view of a fused qkv buffer,
    a view with last-dim stride 2, or contiguous -- of a leaf that requires grad."""
    g = torch.Generator().manual_seed(buf_seed)
    if form == "fused":
        return torch.randn(total, 3, heads, head_dim, generator=g).to(dtype).requires_grad_()[:, 1]
    if form == "last-dim-strided":
        return torch.randn(total, heads, 2 * head_dim, generator=g).to(dtype).requires_grad_()[..., ::2]
    return torch.randn(total, heads, head_dim, generator=g).to(dtype).requires_grad_()


def rope_tables(total, head_dim, strided, seed):
    """cos, sin float32 ``(total, head_dim // 2)`` of random angles in [0, 50), contiguous or as
    non-contiguous column views of one ``(total, 2, head_dim // 2)`` table."""
    angles = torch.rand(total, 2, head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 50
    if strided:
        return angles.cos()[:, 0], angles.sin()[:, 0]
    a = angles[:, 0].contiguous()
    return a.cos(), a.sin()


@sh.examples(20)
@given(
    total=st.one_of(st.integers(0, 3), st.integers(0, 128)),
    heads_q=st.integers(1, 3),
    heads_k=st.integers(1, 3),
    head_dim=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from(ROPE_DTYPES),
    q_form=st.sampled_from(("fused", "last-dim-strided", "contiguous")),
    k_form=st.sampled_from(("fused", "last-dim-strided", "contiguous")),
    strided_tables=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_backends_match_fp64(
    total, heads_q, heads_k, head_dim, dtype, q_form, k_form, strided_tables, seed
):
    """Every CPU rope backend, forward and backward, against the rotation (and its inverse, for the
    gradient) in float64, with FlashAttention's rule and an absolute bound from fp32 math."""
    cos, sin = rope_tables(total, head_dim, strided_tables, seed)
    if q_form == k_form == "fused" and heads_q == heads_k:  # q and k: views of one qkv buffer
        qkv = kc.fused_qkv(total, heads_q, head_dim, dtype, seed=seed + 1).requires_grad_()
        q, k = qkv[:, 0], qkv[:, 1]
    else:
        q = rope_views(total, heads_q, head_dim, dtype, q_form, seed + 1)
        k = rope_views(total, heads_k, head_dim, dtype, k_form, seed + 2)
    gq, gk = (
        torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + i)).to(dtype)
        for i, x in ((3, q), (4, k))
    )
    exact = (kc.rotate_exact(q.detach(), cos, sin), kc.rotate_exact(k.detach(), cos, sin))
    exact_grads = (kc.rotate_exact(gq, cos, -sin), kc.rotate_exact(gk, cos, -sin))

    def run(fn):
        outs = fn(q, k, cos, sin)
        if total == 0:
            return outs, (torch.zeros_like(q), torch.zeros_like(k))
        return outs, torch.autograd.grad(outs, (q, k), (gq, gk))

    same, same_grads = run(rope_2d_ref)
    names = CPU_BACKENDS["rope"]
    assert {"cpu", "torch"} <= set(names), CPU_BACKENDS
    for name in names:
        what = f"rope {name} {dtype} d={head_dim} heads={heads_q}/{heads_k} q {q_form} k {k_form}"
        what += f", {total} tokens"
        if assert_refused("rope", name, q, lambda n=name: nv.ops.apply_rope_2d(q, k, cos, sin, backend=n)):
            continue
        outs, grads = run(lambda *a, n=name: nv.ops.apply_rope_2d(*a, backend=n))
        for label, a, b, r, x, factor in zip(
            ("q_rot", "k_rot", "dq", "dk"),
            (*outs, *grads),
            (*same, *same_grads),
            (*exact, *exact_grads),
            (q, k, gq, gk),
            (FWD, FWD, BWD, BWD),
        ):
            assert a.shape == x.shape and a.dtype == dtype, f"{label} of {what}: {a.shape} {a.dtype}"
            check_rule(f"{label} of {what}", a, b, r, factor, floor=floor_for(name, dtype))
            # fp32 math (the op's contract, fp64 inputs included), then one rounding to the output dtype
            bound = 0.5 * torch.finfo(dtype).eps * r.abs().max().item() if r.numel() else 0.0
            bound += (
                8 * torch.finfo(torch.float32).eps * (x.double().abs().max().item() if x.numel() else 0.0)
            )
            err = (a.double() - r).abs().max().item() if a.numel() else 0.0
            assert err <= bound, f"{label} of {what}: max err {err:.3e} > bound {bound:.3e} from fp32 math"


def test_cpu_rope_takes_empty_strided_inputs():
    """Regression: .contiguous() keeps an empty tensor's strides, which the cpu kernel once refused."""
    q = torch.zeros(0, 1, 32)[..., ::2]
    q_rot, k_rot = nv.ops.apply_rope_2d(q, q, torch.zeros(0, 8), torch.zeros(0, 8), backend="cpu")
    assert q_rot.shape == k_rot.shape == (0, 1, 16)


# ============================================================== 2. packing invariance

FAMILY_PRESETS = {
    "qwen2_vl": nv.VisionConfig.tiny,
    "qwen2_5_vl": nv.VisionConfig.qwen2_5_vl_tiny,
    "qwen3_vl": nv.VisionConfig.qwen3_vl_tiny,
}


@functools.cache
def tiny_tower(family: str) -> nv.NativeViT:
    """The family's tiny tower in float64 with every parameter re-randomised (the default init zeroes
    biases and sets norms to one, which hides mistakes)."""
    torch.manual_seed(0)
    model = nv.NativeViT(FAMILY_PRESETS[family]()).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def encode(model, images, grid, layout):
    """Per-image ``[tokens, *deepstack]`` of one packed batch of ``images`` (patch rows)."""
    px = torch.cat(images)
    tokens, deepstack = model(px, torch.tensor(grid), return_deepstack=True, layout=layout)
    batch = nv.PackedBatch.from_grid(px, torch.tensor(grid))
    per_output = [batch.split(t) for t in (tokens, *deepstack)]
    return [list(outs) for outs in zip(*per_output)]


@st.composite
def groupings(draw, grid):
    """A random order of the images and a random grouping of them into batches, each batch packed or
    padded: ``[(indices, layout), ...]``. One batch of all, a random partition, or ``pack_by_budget``."""
    n = len(grid)
    order = draw(st.permutations(range(n)))
    mode = draw(st.sampled_from(("one batch", "partition", "budget")))
    if mode == "one batch":
        groups = [list(order)]
    elif mode == "partition":
        ids = draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n))
        groups = [[order[i] for i in range(n) if ids[i] == g] for g in sorted(set(ids))]
    else:
        sizes = [math.prod(grid[i]) for i in order]
        budget = draw(st.integers(1, sum(sizes)))
        batches = pack_by_budget(sizes, budget)
        # pack_by_budget's contract, which the grouping relies on
        assert sorted(i for b in batches for i in b) == list(range(n)), batches
        assert all(len(b) == 1 or sum(sizes[i] for i in b) <= budget for b in batches), (batches, budget)
        groups = [[order[i] for i in b] for b in batches]
    layouts = draw(
        st.lists(st.sampled_from(("packed", "padded")), min_size=len(groups), max_size=len(groups))
    )
    return list(zip(groups, layouts))


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
@sh.examples(8)
@given(data=st.data())
def test_any_order_and_grouping_gives_each_image_its_own_output(family, data):
    """Images in a random order and grouping, each batch packed or padded: every image's tokens (and
    DeepStack tokens) equal its tokens encoded alone, fp64, to 1e-12."""
    # Qwen2.5-VL's windows are 8x8 patches: larger grids have several, some cut at the edges
    grid = data.draw(sh.grids(max_side=16 if family == "qwen2_5_vl" else 10, min_images=2, max_images=4))
    groups = data.draw(groupings(grid))
    model = tiny_tower(family)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    images = [
        torch.randn(math.prod(thw), model.config.patch_dim, generator=g, dtype=torch.float64) for thw in grid
    ]
    with torch.no_grad():
        alone = [encode(model, [x], [thw], "packed")[0] for x, thw in zip(images, grid)]
        for members, layout in groups:
            outs = encode(model, [images[i] for i in members], [grid[i] for i in members], layout)
            for i, got in zip(members, outs):
                for j, (a, b) in enumerate(zip(got, alone[i], strict=True)):
                    batch = [grid[m] for m in members]
                    what = f"{family}: image {i} {grid[i]} in {layout} batch {batch}, output {j}"
                    torch.testing.assert_close(
                        a, b, rtol=1e-12, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}"
                    )


# ============================================================== 3. image processor vs transformers

CLASS_MAX = 28 * 28 * 1280  # transformers' class default, and ours


@functools.cache
def hf_processor(min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def make_image(spec: dict):
    rng = np.random.default_rng(spec["seed"])
    h, w = spec["h"], spec["w"]
    if spec["kind"] == "array":
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    rgba[: h // 3, :, 3] = 0  # some fully transparent rows
    image = PIL.Image.fromarray(rgba, "RGBA")
    if spec["mode"] in ("P", "P+t"):
        image = image.convert("RGB").quantize(colors=16)
        if spec["mode"] == "P+t":
            image.info["transparency"] = int(rng.integers(0, 16))
        return image
    return image.convert(spec["mode"])


def run_processor(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001  (either side may refuse; compared below)
        return None, e


@sh.examples(25)
@given(
    specs=st.lists(sh.image_specs(), min_size=1, max_size=3),
    min_pixels=st.sampled_from((56 * 56, 28 * 28)),
    max_pixels=st.one_of(st.just(CLASS_MAX), st.integers(56 * 56, 300 * 300)),
)
def test_processor_matches_transformers_or_both_refuse(specs, min_pixels, max_pixels):
    """Tolerance: none. Grids equal and ``pixel_values`` bit-identical (our pipeline is transformers'
    bit for bit); or both refuse the call (ours with a ValueError)."""
    images = [make_image(s) for s in specs]
    ours, our_err = run_processor(lambda: nv.ImageProcessor(min_pixels, max_pixels)(images))
    with one_thread():
        # arrays are HWC: say so, or transformers guesses CHW for arrays whose first side is <= 4
        ref, ref_err = run_processor(
            lambda: hf_processor(min_pixels, max_pixels)(
                images, return_tensors="pt", input_data_format="channels_last"
            )
        )
    what = f"{[(s['kind'], s['mode'], s['h'], s['w']) for s in specs]}, pixels {min_pixels}..{max_pixels}"
    if ref_err is not None or our_err is not None:
        assert ref_err is not None and our_err is not None, (
            f"{what}: only one side refuses -- ours: {our_err!r}; transformers: {ref_err!r}"
        )
        assert isinstance(our_err, ValueError), f"{what}: we refuse with {our_err!r}, not a ValueError"
        event("both refuse")
        return
    assert torch.equal(ours.grid_thw, ref["image_grid_thw"]), (
        f"{what}: grid {ours.grid_thw.tolist()} vs transformers {ref['image_grid_thw'].tolist()}"
    )
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_values.shape == ref["pixel_values"].shape
    same = torch.equal(ours.pixel_values, ref["pixel_values"])
    assert same, f"{what}: max |diff| {(ours.pixel_values - ref['pixel_values']).abs().max().item()}"


# ============================================================== 4. checkpoints

ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SPECIAL = (float("nan"), float("inf"), float("-inf"), -0.0, 5e-45, 1e-40)


@st.composite
def tiny_configs(draw) -> nv.VisionConfig:
    family = draw(st.sampled_from(sorted(nv.config.FAMILIES)))
    depth = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    embed_dim = heads * draw(st.sampled_from((4, 8, 12, 16)))
    patch = draw(st.sampled_from((14, 16)))
    merge = draw(st.sampled_from((2, 1)))
    kw = dict(
        model_type=family,
        in_channels=draw(st.sampled_from((3, 1, 4))),
        temporal_patch_size=draw(st.sampled_from((2, 1))),
        spatial_merge_size=merge,
        depth=depth,
        num_heads=heads,
        embed_dim=embed_dim,
        out_hidden_size=draw(st.integers(1, 40)),
        hidden_act=draw(st.sampled_from(ACTS)),
        rope_theta=draw(st.one_of(st.just(10000.0), st.floats(1.0, 1e6))),
        patch_size=patch,
    )
    fam = nv.config.FAMILIES[family]
    derived = {name for name, _ in fam.derived}  # computed from the rest: left to the family
    blocks = st.lists(st.integers(0, depth - 1), unique=True, max_size=depth).map(tuple)
    if family == "qwen2_vl":
        if draw(st.booleans()):
            kw["mlp_ratio"] = draw(st.one_of(st.sampled_from((1.0, 2.0, 4.0)), st.floats(0.25, 4.0)))
        else:
            kw["intermediate_size"] = draw(st.integers(1, 96))
    elif "intermediate_size" not in derived:
        kw["intermediate_size"] = draw(st.integers(1, 96))
    if not fam.merger_width_field:  # no merger width of its own: the tower's output is its width
        kw["out_hidden_size"] = embed_dim
    if family == "qwen2_5_vl":
        kw["window_size"] = draw(st.one_of(st.just(0), st.integers(merge * patch, 300)))
        kw["fullatt_block_indexes"] = draw(blocks)
    if family == "qwen3_vl":
        kw["num_position_embeddings"] = draw(st.integers(0, 8)) ** 2
        kw["deepstack_visual_indexes"] = draw(blocks)
    kw.update(fam.fixed)  # what the family always has (Ernie, Pixtral: one frame)
    kw.update({name: None for name in derived})
    # the family's other settings (GLM's merger width, Kimi's frame count ...) from its tiny tower
    tiny = nv.VisionConfig.preset(family, tiny=True)
    drawn_above = ("window_size", "fullatt_block_indexes", "deepstack_visual_indexes", "mlp_ratio")
    rest = {
        f.name: getattr(tiny, f.name)
        for f in dataclasses.fields(tiny)
        if f.name not in (*kw, *derived, *drawn_above, "intermediate_size")
    }
    return nv.VisionConfig(**rest, **kw)


def mlp_ratio_loses_width(cfg: nv.VisionConfig) -> bool:
    """Whether ``h / embed_dim`` alone would not give the MLP width h back (``int(embed_dim * ratio)``):
    the case ``test_mlp_ratio_round_trips_every_width`` keeps fixed."""
    h, e = cfg.mlp_hidden_dim, cfg.embed_dim
    return cfg.model_type == "qwen2_vl" and int(e * (h / e)) != h


def tower_fields(cfg: nv.VisionConfig) -> dict:
    """What a config says about the tower: every field, with the MLP width as a number of units
    (Qwen2-VL releases give it as ``mlp_ratio``, the others as ``intermediate_size``)."""
    out = dataclasses.asdict(cfg)
    del out["mlp_ratio"], out["intermediate_size"]
    return {**out, "mlp_hidden_dim": cfg.mlp_hidden_dim}


def random_tower(cfg: nv.VisionConfig, dtype: torch.dtype, seed: int, special: bool) -> nv.NativeViT:
    model = nv.NativeViT(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(model.state_dict().values()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 3)
            if special and p.numel() and i % 3 == 0:
                flat = p.view(-1)
                for j, value in enumerate(SPECIAL[: flat.numel()]):
                    flat[(j * 7919 + i) % flat.numel()] = value
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN payloads and -0.0 included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(ints[t.element_size()])


def model_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.name.endswith(".safetensors") or p.name.endswith(".json")}


def save_and_check_layout(model: nv.NativeViT, path: Path, max_shard_bytes: int | None) -> None:
    """Save; the layout is one file iff everything fits one shard, else shards plus an index that maps
    exactly the tower's keys; nothing else of an earlier save is left."""
    model.save_pretrained(path, **({} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}))
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or max_shard_bytes >= total:
        assert model_files(path) == {"config.json", "model.safetensors"}, sorted(model_files(path))
    else:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        keys = sorted(release_checkpoint_key(k, model.config.family) for k in state)
        assert len(shards) > 1 and sorted(index["weight_map"]) == keys
        assert model_files(path) == {"config.json", "model.safetensors.index.json", *shards}


def assert_loads_identical(model: nv.NativeViT, path: Path) -> None:
    loaded = nv.NativeViT.from_pretrained(path)
    cfg = model.config
    canonical = cfg.intermediate_size is None if cfg.model_type == "qwen2_vl" else True
    if canonical and float(cfg.mlp_ratio * cfg.embed_dim).is_integer():
        assert loaded.config == cfg, f"config {loaded.config} != saved {cfg}"
    assert tower_fields(loaded.config) == tower_fields(cfg), f"config {loaded.config} != saved {cfg}"
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        a, b = got[key], want[key]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (
            f"{key}: loaded {a.dtype} {tuple(a.shape)}, saved {b.dtype} {tuple(b.shape)}"
        )
        same = torch.equal(bits(a), bits(b))
        assert same, f"{key} differs after the round trip"


shard_sizes = st.one_of(st.none(), st.integers(1, 200_000))


@sh.examples(15)
@given(
    first=tiny_configs(),
    second=tiny_configs(),
    dtypes=st.tuples(st.sampled_from(WEIGHT_DTYPES), st.sampled_from(WEIGHT_DTYPES)),
    shards=st.tuples(shard_sizes, shard_sizes),
    special=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_checkpoint_round_trip_and_overwrite(first, second, dtypes, shards, special, seed):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        model = random_tower(first, dtypes[0], seed, special)
        save_and_check_layout(model, path, shards[0])
        assert_loads_identical(model, path)
        again = random_tower(second, dtypes[1], seed + 1, special)
        save_and_check_layout(again, path, shards[1])
        assert_loads_identical(again, path)


def test_mlp_ratio_round_trips_every_width(tmp_path):
    """Regression: 28 * (61 / 28) = 60.99.. once made a saved Qwen2-VL tower unloadable."""
    cfg = nv.VisionConfig.tiny(embed_dim=28, num_heads=1, intermediate_size=61, depth=1)
    assert mlp_ratio_loses_width(cfg)
    model = random_tower(cfg, torch.float32, 0, False)
    model.save_pretrained(tmp_path)
    assert_loads_identical(model, tmp_path)


def test_norm_eps_is_never_dropped_on_save(tmp_path):
    """Regression: a tower saved with norm_eps=1e-2 once loaded with 1e-6, silently."""
    cfg = nv.VisionConfig.tiny(depth=1, norm_eps=1e-2)
    model = random_tower(cfg, torch.float64, 0, False)
    try:
        model.save_pretrained(tmp_path)
    except ValueError as e:  # refusing, naming the field, is a fix too
        assert "norm_eps" in str(e)
        return
    assert nv.NativeViT.from_pretrained(tmp_path).config.norm_eps == cfg.norm_eps
