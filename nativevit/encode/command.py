"""``nativevit encode INPUT --out DIR``: native-resolution features of a whole dataset, on one process or
many (``torchrun``).

A run, on every rank:

1. builds the model (a checkpoint, or a preset's random weights seeded with ``--seed``) and the
   processor, and checks ``DIR`` (rank 0: settings must match, stale temporary files go, the manifest is
   brought up to date with the shards on disk, which lists the items already done);
2. lists the input (every rank the same way) and reads every pending item's header, the scan units
   spread over ranks and ``DataLoader`` workers; the results are gathered on all ranks;
3. spreads the items over ranks by token count (largest first, to the least-loaded rank) and packs each
   rank's items into token-budget batches (``nativevit.packing.pack_by_budget``);
4. encodes: workers decode and preprocess batches, the encoder runs them, shards are written as it goes;
5. gathers the ranks' stats and errors; rank 0 writes ``manifest.parquet``, ``errors.jsonl`` and
   ``summary.json``.

Exit status: 0 when the run completed (inputs that could not be read are listed in ``errors.jsonl`` and
counted; 1 for them under ``--strict``), 2 for bad arguments, 1 when the work failed; one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import strategies as strategies_mod
from ..config import VisionConfig, family
from ..packing import pack_by_budget
from ..preprocess import ImageProcessor
from .loader import ScanUnits, assign_by_tokens, loader
from .runner import ShardWriter, encode_rank
from .sources import InputError, InputSpec, Record, list_units, resolve_input
from .store import (
    ERRORS_FILE,
    FORMAT,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_FILE,
    SETTINGS_FILE,
    SHARD_DIR,
    SHARD_NAME,
    SUMMARY_FILE,
    TMP_SUFFIX,
    collect_manifest,
    read_json,
    settings_digest,
    shard_files,
    write_json,
    write_jsonl,
)

PROG = "nativevit encode"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE = "native"
FEATURES = ("merged", "hidden")
DEFAULT_MAX_TOKENS = 16384
DEFAULT_BATCHES_PER_SHARD = 4
# Ranks wait for each other at the end (the slowest rank's last batches); torchrun ends every rank
# when one fails, so a long timeout never hides a dead peer.
DIST_TIMEOUT = datetime.timedelta(hours=12)
RUN_ERRORS = (OSError, RuntimeError, ValueError, MemoryError)


def preset_names() -> tuple[str, ...]:
    """``VisionConfig`` presets that take no required argument (``tiny``, ``qwen2_vl``, ...)."""
    names = []
    for name, attr in vars(VisionConfig).items():
        if name.startswith("_") or not isinstance(attr, classmethod):
            continue
        params = inspect.signature(getattr(VisionConfig, name)).parameters.values()
        required = [
            p for p in params if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        if not required:
            names.append(name)
    return tuple(sorted(names))


# ----------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line: ``prog: error: message (see prog --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def add_encode_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``nativevit encode``'s arguments to ``parser`` (a sub-command parser of ``nativevit``, or
    the parser of ``python -m nativevit.encode``); ``args.func(args)`` then runs it."""
    parser.description = parser.description or (
        "Encode every image of a folder, a list file or webdataset tar shards with a native-resolution "
        "tower and write the features (variable-length token grids) as safetensors shards with a "
        "parquet manifest. Run it under torchrun to spread the work over processes and machines; rerun "
        "the same command to finish a run that was stopped."
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="a folder (images found recursively), a text file with one image path per line, or "
        "webdataset .tar shards (a brace pattern such as 'data-{000..015}.tar')",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, metavar="CKPT_DIR", help="a released or saved checkpoint")
    model.add_argument(
        "--preset",
        choices=preset_names(),
        metavar="NAME",
        help=f"random weights of a VisionConfig preset, for benchmarking: {', '.join(preset_names())}",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of --preset's random weights (torch.manual_seed; default 0)"
    )
    parser.add_argument(
        "--strategy",
        default=NATIVE,
        choices=(NATIVE, *strategies_mod.NAMES),
        metavar="NAME",
        help="resolution strategy: native (the model's own processor, default) or one of "
        f"{', '.join(strategies_mod.NAMES)} (each view encoded; an item's features are its views' rows)",
    )
    parser.add_argument(
        "--max-tokens",
        type=_int_at_least(1),
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"token budget per batch, in encoder patches (default {DEFAULT_MAX_TOKENS}); a larger image "
        "is a batch of its own",
    )
    parser.add_argument(
        "--features",
        choices=FEATURES,
        default="merged",
        help="merged: the patch merger's output (default; what the language model sees); hidden: the "
        "pre-merger states of the last block",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model and feature dtype")
    parser.add_argument("--backend", default="auto", help="attention backend (default auto)")
    parser.add_argument(
        "--device", help="cpu or cuda[:N] (default: the local rank's GPU when there is one, else cpu)"
    )
    parser.add_argument(
        "--workers",
        type=_int_at_least(0),
        metavar="N",
        help="decode/preprocess processes per rank (default: the rank's share of the CPU cores less one, "
        "at most 8; 0: in the main process)",
    )
    parser.add_argument("--min-pixels", type=_int_at_least(1), metavar="N", help="processor min_pixels")
    parser.add_argument("--max-pixels", type=_int_at_least(1), metavar="N", help="processor max_pixels")
    parser.add_argument(
        "--batches-per-shard",
        type=_int_at_least(1),
        default=DEFAULT_BATCHES_PER_SHARD,
        metavar="N",
        help=f"token-budget batches per shard file (default {DEFAULT_BATCHES_PER_SHARD}): what a stopped "
        "run may lose",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR's features even if made with other settings"
    )
    parser.add_argument("--strict", action="store_true", help="exit status 1 when any input failed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    parser.set_defaults(func=run_encode, parser=parser)
    return parser


class UsageError(ValueError):
    """A bad argument found after parsing (exit status 2)."""


class Refused(RuntimeError):
    """Rank 0 refused the output folder (exit status 1); other ranks exit quietly."""


@dataclass
class Job:
    """Validated arguments."""

    input: InputSpec
    out: Path
    checkpoint: Path | None
    preset: str | None
    seed: int
    cfg: VisionConfig
    proc: ImageProcessor
    strategy: str
    features: str
    dtype: str
    backend: str
    device: torch.device
    workers: int
    max_tokens: int
    batches_per_shard: int
    overwrite: bool
    strict: bool
    quiet: bool


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _default_workers(local_world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // max(local_world, 1) - 1))


def _released_processor(checkpoint: Path, pixel_bounds: bool = True) -> dict[str, Any]:
    """``min_pixels``, ``max_pixels``, ``image_mean``, ``image_std`` of a checkpoint's
    ``preprocessor_config.json`` (either spelling of the pixel bounds), when it has one. Without
    ``pixel_bounds`` (a family whose images are sized otherwise: Pixtral's longest edge, SigLIP2's patch
    budget) only the mean and std."""
    file = checkpoint / "preprocessor_config.json"
    if not file.is_file():
        return {}
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise UsageError(f"argument --checkpoint: {file} is not a JSON object")
    out = {
        k: raw[k] for k in ("min_pixels", "max_pixels", "image_mean", "image_std") if raw.get(k) is not None
    }
    if not pixel_bounds:
        return {k: v for k, v in out.items() if k in ("image_mean", "image_std")}
    size = raw.get("size")
    if isinstance(size, dict):
        if "min_pixels" not in out and size.get("shortest_edge") is not None:
            out["min_pixels"] = size["shortest_edge"]
        if "max_pixels" not in out and size.get("longest_edge") is not None:
            out["max_pixels"] = size["longest_edge"]
    return out


def make_processor(
    cfg: VisionConfig,
    *,
    checkpoint: Path | None = None,
    strategy: str = NATIVE,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ImageProcessor:
    """The processor of a run: the tower family's release preset (``ImageProcessor.for_model``) with the
    tower's patching, then the checkpoint's ``preprocessor_config.json``, then ``--min/--max-pixels``.
    The pixel cap is raised to ``max_pixels`` when that is larger."""
    opts = dict(family(cfg.model_type).processor)
    opts.update(
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        merge_size=cfg.spatial_merge_size,
    )
    if checkpoint is not None:
        opts.update(_released_processor(checkpoint, pixel_bounds="max_pixels" in opts))
    if min_pixels is not None:
        opts["min_pixels"] = min_pixels
    if max_pixels is not None:
        opts["max_pixels"] = max_pixels
    defaults = inspect.signature(ImageProcessor).parameters
    bound = opts.get("max_pixels", defaults["max_pixels"].default)
    opts["pixel_cap"] = max(opts.get("pixel_cap", defaults["pixel_cap"].default), bound)
    return ImageProcessor(**opts, strategy=None if strategy == NATIVE else strategy)


def check_args(args: argparse.Namespace) -> Job:
    """Everything that can be checked without loading weights or reading images; ``UsageError``."""
    try:
        spec = resolve_input(args.input)
    except InputError as e:
        raise UsageError(f"argument INPUT: {e}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {str(out)!r} exists and is not a folder")
    if args.checkpoint is not None:
        from ..checkpoint import read_config

        if not args.checkpoint.is_dir():
            raise UsageError(f"argument --checkpoint: no checkpoint folder at {str(args.checkpoint)!r}")
        try:
            cfg, _ = read_config(args.checkpoint)
        except (OSError, ValueError) as e:
            raise UsageError(f"argument --checkpoint: {e}") from None
    else:
        cfg = getattr(VisionConfig, args.preset)()
    if args.strategy not in (NATIVE, "qwen2_vl") and (args.min_pixels or args.max_pixels):
        raise UsageError(f"--min-pixels/--max-pixels apply to the native strategy, not {args.strategy!r}")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        raise UsageError(
            f"argument --min-pixels: {args.min_pixels} is larger than --max-pixels {args.max_pixels}"
        )
    try:
        proc = make_processor(
            cfg,
            checkpoint=args.checkpoint,
            strategy=args.strategy,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
        )
    except (TypeError, ValueError) as e:
        raise UsageError(f"argument --strategy: {e}") from None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is None:
        device = _default_device(local_rank)
    else:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise UsageError(
                f"argument --device: not a device: {args.device!r} (use cpu or cuda[:N])"
            ) from None
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"argument --device: {args.device!r}: use cpu or cuda[:N]")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"argument --device: {args.device!r}: no CUDA device here")
            if device.index is None:
                device = torch.device("cuda", local_rank % torch.cuda.device_count())
            elif device.index >= torch.cuda.device_count():
                raise UsageError(
                    f"argument --device: {args.device!r}: there are {torch.cuda.device_count()} GPUs"
                )
    from ..ops import resolve_backend

    probe = torch.empty(1, cfg.num_heads, cfg.head_dim, dtype=DTYPES[args.dtype], device=device)
    try:
        resolve_backend("attention", args.backend, probe)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"argument --backend: {e}") from None
    workers = args.workers
    if workers is None:
        workers = _default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return Job(
        input=spec,
        out=out,
        checkpoint=args.checkpoint.resolve() if args.checkpoint is not None else None,
        preset=args.preset,
        seed=args.seed,
        cfg=cfg,
        proc=proc,
        strategy=args.strategy,
        features=args.features,
        dtype=args.dtype,
        backend=args.backend,
        device=device,
        workers=workers,
        max_tokens=args.max_tokens,
        batches_per_shard=args.batches_per_shard,
        overwrite=args.overwrite,
        strict=args.strict,
        quiet=args.quiet,
    )


# ----------------------------------------------------------------------------- model and settings


def build_model(job: Job):
    """The tower on the CPU in the run's dtype. Random weights come from ``torch.manual_seed(seed)``
    just before ``NativeViT(cfg)`` (the global RNG is restored after), so every rank, rerun and user
    gets the same ones."""
    from ..model import NativeViT

    dtype = DTYPES[job.dtype]
    if job.checkpoint is not None:
        return NativeViT.from_pretrained(job.checkpoint, attn_backend=job.backend, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        model = NativeViT(job.cfg, attn_backend=job.backend)
    return model.to(dtype=dtype).eval()


def weights_digest(model) -> str:
    """sha256 over the tower's tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def make_settings(job: Job, weights: str) -> dict[str, Any]:
    """What the features depend on; a rerun into the same folder must give the same dict. The token
    budget, workers, backend, device and process count are left out: they do not change the features
    (beyond floating-point round-off)."""
    p = job.proc
    settings = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "input": {"kind": job.input.kind, "path": job.input.path},
        "model": {
            "config": dataclasses.asdict(job.cfg),
            "weights_sha256": weights,
            "preset": job.preset,
            "seed": job.seed if job.preset is not None else None,
        },
        "dtype": job.dtype,
        "features": job.features,
        "strategy": job.strategy,
        "processor": {
            "min_pixels": p.min_pixels,
            "max_pixels": p.max_pixels,
            "patch_size": p.patch_size,
            "temporal_patch_size": p.temporal_patch_size,
            "merge_size": p.merge_size,
            "image_mean": p.image_mean.tolist(),
            "image_std": p.image_std.tolist(),
            "pixel_cap": p.pixel_cap,
            "max_input_pixels": p.max_input_pixels,
        },
    }
    return json.loads(json.dumps(settings))  # as it reads back from encode.json


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if old == new else [f"{where}: {_short(old)} there, {_short(new)} here"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:12] + "..."


# ----------------------------------------------------------------------------- processes


class Group:
    """This process's place in the run: rank, world size, and the collectives of the run (none when
    alone). Object collectives go over gloo (on CUDA runs the default group is NCCL)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self._objects = None
        self._started = False

    def start(self, device: torch.device) -> None:
        if self.world <= 1 or self._started:
            return
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=DIST_TIMEOUT)
        self._started = True
        self._objects = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT) if backend != "gloo" else None

    def gather(self, obj: Any) -> list[Any]:
        if self.world <= 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._objects)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world <= 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._objects)
        return box[0]

    def close(self) -> None:
        if self._started:
            self._started = False
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the output folder


def _clear(out: Path) -> None:
    """Remove what earlier runs wrote (our files only)."""
    shards = out / SHARD_DIR
    if shards.is_dir():
        for name in os.listdir(shards):
            if SHARD_NAME.fullmatch(name.removesuffix(TMP_SUFFIX).removesuffix(".corrupt")):
                (shards / name).unlink()
        with contextlib.suppress(OSError):
            shards.rmdir()
    for name in (MANIFEST_FILE, ERRORS_FILE, SUMMARY_FILE, SETTINGS_FILE):
        for path in (out / name, out / (name + TMP_SUFFIX)):
            path.unlink(missing_ok=True)


def _remove_temporary(out: Path) -> None:
    """Files a stopped run left half-written (never renamed into place)."""
    for folder in (out, out / SHARD_DIR):
        if folder.is_dir():
            for name in os.listdir(folder):
                if name.endswith(TMP_SUFFIX):
                    (folder / name).unlink(missing_ok=True)


def _set_aside(out: Path):
    def handle(rel: str, error: Exception) -> None:
        os.replace(out / rel, out / (rel + ".corrupt"))
        print(
            f"{PROG}: warning: {error}; moved aside as {rel}.corrupt, its items will be encoded again",
            file=sys.stderr,
        )

    return handle


def prepare_output(job: Job, settings: dict[str, Any]) -> tuple[int, int]:
    """Rank 0: make ``DIR`` ready for this run. Refuses (``Refused``) a folder of other settings unless
    ``--overwrite``; removes temporary files; writes ``encode.json``; brings the manifest up to date.
    Returns ``(attempt, items already done)``; ``attempt`` numbers this run's shards."""
    from .. import __version__

    out = job.out
    current = out / SETTINGS_FILE
    ours = bool(shard_files(out)) or (out / MANIFEST_FILE).exists()
    if current.is_file():
        old = read_json(current).get("settings")
        diff = _differences(old, settings)
        if diff and not job.overwrite:
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise Refused(
                f"{out} holds features made with other settings ({'; '.join(diff[:3])}{more}); pass "
                "--overwrite to replace them, or choose another --out"
            )
    elif ours and not job.overwrite:
        raise Refused(f"{out} holds encode output but no {SETTINGS_FILE}; pass --overwrite to replace it")
    if job.overwrite:
        _clear(out)
    _remove_temporary(out)
    (out / SHARD_DIR).mkdir(exist_ok=True)
    digest = settings_digest(settings)
    if not current.is_file():
        write_json(
            current,
            {
                "settings": settings,
                "digest": digest,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "nativevit": __version__,
                "checkpoint": str(job.checkpoint) if job.checkpoint is not None else None,
            },
        )
    table = collect_manifest(out, digest=digest, write=True, on_corrupt=_set_aside(out))
    attempts = [int(SHARD_NAME.fullmatch(rel.split("/")[-1]).group(1)) for rel in shard_files(out)]
    return max(attempts, default=0) + 1, table.num_rows


def _lock(out: Path) -> int:
    """An exclusive lock on ``DIR`` held by rank 0 for the run (released when the process ends)."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise Refused(f"another nativevit encode is writing to {out}") from None
    return fd


def _source_text(source) -> str:
    if isinstance(source, str):
        return source
    shard, offset, size = source
    return f"{shard}@{offset}+{size}"


# ----------------------------------------------------------------------------- the run


def _scan(job: Job, group: Group, done: set[str]) -> tuple[list[Record], list[tuple[Record, str]]]:
    """Every pending item's header, the units shared over ranks and workers; the same result on every
    rank: ``(records to encode, [(record, why), ...] that cannot be)``."""
    units = list_units(job.input, done)
    names = hashlib.sha256("\n\n".join(u.name for u in units).encode()).hexdigest()
    if len(set(group.gather(names))) > 1:
        raise RuntimeError(
            f"the ranks list different items in {job.input.path}; they must see the same files"
        )
    mine = [(i, u) for i, u in enumerate(units) if i % group.world == group.rank]
    found = list(loader(ScanUnits(mine, job.proc, done), job.workers)) if mine else []
    scanned = sorted((pair for part in group.gather(found) for pair in part), key=lambda pair: pair[0])
    records, failed, seen = [], [], {}
    for _, unit_records in scanned:
        for r in unit_records:
            if r.error is not None:
                failed.append((r, r.error))
            elif r.key in seen:
                failed.append((r, f"duplicate key: already read from {seen[r.key]}"))
            else:
                seen[r.key] = _source_text(r.source)
                records.append(r)
    return records, failed


def _padding(lengths: list[int], batches: list[list[int]], budget: int) -> tuple[int, int]:
    """``(unused, capacity)`` tokens of the batches: what the packer left empty of each budget."""
    unused = capacity = 0
    for b in batches:
        tokens = sum(lengths[i] for i in b)
        unused += max(0, budget - tokens)
        capacity += max(budget, tokens)
    return unused, capacity


def _run(job: Job, group: Group) -> int:
    start = time.perf_counter()
    say = (lambda *a: print(*a, file=sys.stderr)) if group.rank == 0 and not job.quiet else (lambda *a: None)
    group.start(job.device)
    model = build_model(job)
    lock_fd = None
    state: dict[str, Any] = {}
    if group.rank == 0:
        try:
            job.out.mkdir(parents=True, exist_ok=True)
            lock_fd = _lock(job.out)
            settings = make_settings(job, weights_digest(model))
            attempt, done_before = prepare_output(job, settings)
            state = {"digest": settings_digest(settings), "attempt": attempt, "done": done_before}
        except RUN_ERRORS as e:
            state = {"error": " ".join(str(e).split()) or type(e).__name__}
    state = group.broadcast(state)
    try:
        if "error" in state:
            if group.rank == 0:
                raise Refused(state["error"])
            return 1
        model = model.to(job.device)
        done = set(collect_manifest(job.out, digest=state["digest"]).column("key").to_pylist())
        t = time.perf_counter()
        records, failed = _scan(job, group, done)
        scan_s = time.perf_counter() - t
        lengths = [r.patches for r in records]
        mine = assign_by_tokens(lengths, group.world)[group.rank]
        my_records = [records[i] for i in mine]
        batches = pack_by_budget([r.patches for r in my_records], job.max_tokens)
        say(
            f"{PROG}: {len(records)} items to encode ({len(done)} already in {job.out}, {len(failed)} "
            f"unreadable) on {group.world} process(es), {job.workers} worker(s) each"
        )
        writer = ShardWriter(
            job.out,
            digest=state["digest"],
            attempt=state["attempt"],
            rank=group.rank,
            batches_per_shard=job.batches_per_shard,
        )
        stats, errors = encode_rank(
            model,
            my_records,
            batches,
            job.proc,
            writer,
            hidden=job.features == "hidden",
            device=job.device,
            workers=job.workers,
            progress=group.rank == 0 and not job.quiet,
            desc="encode" if group.world == 1 else f"encode (rank 0 of {group.world})",
        )
        unused, capacity = _padding([r.patches for r in my_records], batches, job.max_tokens)
        mine_errors = [(r.key, _source_text(r.source), why) for r, why in errors]
        parts = group.gather((stats.as_dict(), mine_errors, unused, capacity))
        if group.rank != 0:
            n_errors = len(failed) + sum(len(p[1]) for p in parts)
            return 1 if job.strict and n_errors else 0
        return _finish(job, state, parts, failed, scan_s, time.perf_counter() - start)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _finish(job: Job, state: dict, parts: list, failed: list, scan_s: float, wall: float) -> int:
    """Rank 0, after every rank is done: manifest, errors file, summary."""
    from ..ops import resolve_backend

    table = collect_manifest(job.out, digest=state["digest"], write=True)
    errors = [{"key": r.key, "source": _source_text(r.source), "error": why} for r, why in failed]
    errors += [
        {"key": k, "source": s, "error": why} for _, rank_errors, _, _ in parts for k, s, why in rank_errors
    ]
    errors.sort(key=lambda e: e["key"])
    write_jsonl(job.out / ERRORS_FILE, errors)
    ranks = [p[0] for p in parts]
    items = sum(r["items"] for r in ranks)
    tokens = sum(r["patches"] for r in ranks)
    seconds = max((r["loop_s"] for r in ranks), default=0.0)
    unused = sum(p[2] for p in parts)
    capacity = sum(p[3] for p in parts)
    probe = torch.empty(1, job.cfg.num_heads, job.cfg.head_dim, dtype=DTYPES[job.dtype], device=job.device)
    summary = {
        "items": items,
        "tokens": tokens,
        "feature_rows": sum(r["rows"] for r in ranks),
        "seconds": seconds,
        "items_per_s": items / seconds if seconds else 0.0,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "padding": unused / capacity if capacity else 0.0,
        "errors": len(errors),
        "total_items": table.num_rows,
        "already_done": state["done"],
        "wall_seconds": wall,
        "batches": sum(r["batches"] for r in ranks),
        "shards": sum(r["shards"] for r in ranks),
        "time": {
            "scan_s": scan_s,
            "decode_s": sum(r["decode_s"] for r in ranks),
            "encoder_s": sum(r["encoder_s"] for r in ranks),
            "wait_s": sum(r["wait_s"] for r in ranks),
            "write_s": sum(r["write_s"] for r in ranks),
        },
        "world_size": len(ranks),
        "workers": job.workers,
        "max_tokens": job.max_tokens,
        "features": job.features,
        "dtype": job.dtype,
        "strategy": job.strategy,
        "device": job.device.type,
        "backend": resolve_backend("attention", job.backend, probe).name,
        "ranks": ranks,
    }
    write_json(job.out / SUMMARY_FILE, summary)
    where = f" (see {job.out / ERRORS_FILE})" if errors else ""
    if not job.quiet:
        print(
            f"encoded {items} items ({tokens} tokens) in {seconds:.1f} s: {summary['items_per_s']:.1f} "
            f"items/s, {summary['tokens_per_s']:,.0f} tokens/s, packer padding {summary['padding']:.1%}; "
            f"{len(errors)} errors{where}; {table.num_rows} items in {job.out}"
        )
    if errors and job.strict:
        print(f"{PROG}: error: {len(errors)} inputs were not encoded{where}", file=sys.stderr)
        return 1
    if errors and job.quiet:
        print(f"{PROG}: {len(errors)} inputs were not encoded{where}", file=sys.stderr)
    return 0


def run_encode(args: argparse.Namespace) -> int:
    """Run ``nativevit encode`` with parsed arguments; returns the exit status (a bad argument found
    here exits with status 2 through the parser, as argparse does)."""
    group = Group()
    try:
        job = check_args(args)
    except UsageError as e:
        parser = getattr(args, "parser", None)
        if parser is not None:
            parser.error(str(e))
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(job, group)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except RUN_ERRORS as e:
        prefix = f"rank {group.rank}: " if group.world > 1 else ""
        print(f"{PROG}: error: {prefix}{' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        group.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m nativevit.encode INPUT --out DIR ...``."""
    parser = add_encode_arguments(_Parser(prog=PROG))
    args = parser.parse_args(argv)
    return run_encode(args)


__all__ = [
    "DTYPES",
    "Group",
    "add_encode_arguments",
    "build_model",
    "check_args",
    "main",
    "make_processor",
    "preset_names",
    "run_encode",
]
