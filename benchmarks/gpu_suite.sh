#!/usr/bin/env bash
# The GPU checks of nativevit in one command: about 8 minutes on one H100/H200-class GPU.
#
#   benchmarks/gpu_suite.sh               # results in benchmarks/results/<gpu-name>/
#   benchmarks/gpu_suite.sh --out DIR     # results in DIR
#   benchmarks/gpu_suite.sh --smoke DIR   # the same steps on a CPU at toy sizes: checks the plumbing only
#                                         # (no build, the CUDA tests are only collected, no GPU numbers)
#
# Steps, each time-boxed (a failed or timed-out step is recorded, the others still run, and the exit
# status is then 1):
#   build         nativevit._C with the CUDA kernels for this GPU's architecture
#   tests-cuda    pytest -k cuda: the tests marked cuda (C++/CUDA and Triton kernels at image sizes) and
#                 tests/test_cuda_graphs.py (graph capture, skipped without CUDA but not marked)
#   kernels-bf16  nativevit kernels, bf16, head dims 64/72/80/128, every image set and the two mixes:
#                 our backends against torch varlen_attn, FlexAttention, SDPA per image and padded,
#                 flash-attn and xformers when installed
#   kernels-fp    the same at head dim 80 in fp16 and fp32 on the seed set and the skewed mix
#   encoder       nativevit bench: Qwen2-VL tower, 32 blocks, bf16, seed and skewed sets, packed vs
#                 padded vs transformers, eager and torch.compile'd
#   plots         PNG beside every CSV;   summary   summary.md (steps, tables, plots)
# Without a GPU it says so and exits with status 2 within seconds.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; OUT=${2:?--smoke needs a folder}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$SMOKE" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    echo "gpu_suite: no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia*); this suite needs one" \
      "(benchmarks/gpu_suite.sh --smoke DIR checks its plumbing on a CPU)" >&2
    exit 2
  fi
  if ! GPU=$(timeout 120 "$PY" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device (torch " + torch.__version__ + ", CUDA " + str(torch.version.cuda) + ")")
from nativevit.bench.env import hardware_name
print(hardware_name("cuda"))'); then
    echo "gpu_suite: no usable GPU: see the line above" >&2
    exit 2
  fi
  ARCH=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
  DEVICE=cuda
  OUT=${OUT:-benchmarks/results/$GPU}
  # sizes of the real run
  KERNEL_ITERS=(--warmup 2 --iters 10)
  KERNEL_BF16=(--dtypes bf16 --head-dims 64 72 80 128)
  KERNEL_FP=(--dtypes fp16 fp32 --head-dims 80 --sets seed mix-skewed)
  ENCODER=(--model qwen2_vl --depth 32 --dtype bf16 --images seed skewed --warmup 1 --iters 5)
else
  DEVICE=cpu
  GPU="smoke-$("$PY" -c 'from nativevit.bench.env import hardware_name; print(hardware_name("cpu"))')"
  KERNEL_ITERS=(--quick --warmup 0 --iters 1)
  KERNEL_BF16=(--dtypes bf16 --head-dims 16 --heads 2 --sets mix-skewed)
  KERNEL_FP=(--dtypes fp32 --head-dims 16 --heads 2 --sets mix-skewed)
  ENCODER=(--model tiny --depth 1 --dtype fp32 --images seed --max-pixels 12544 --iters 1)
fi

COMPARE=()
if "$PY" -c 'import transformers' >/dev/null 2>&1; then
  COMPARE=(--compare transformers)
else
  echo "gpu_suite: transformers is not installed: the encoder step runs without the transformers comparison"
fi

mkdir -p "$OUT/logs" || exit 1
STEPS="$OUT/steps.tsv"
: > "$STEPS"
FAILED=0
SUITE_START=$(date +%s)

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, output to logs/NAME.log, status to steps.tsv
step() {
  local name=$1 limit=$2 start rc status
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then status=ok
  elif [ $rc = 124 ] || [ $rc = 137 ]; then status="timed out after ${limit}s"; FAILED=1
  else status="failed (exit $rc)"; FAILED=1
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >> "$STEPS"
  echo "   $status in $(( $(date +%s) - start ))s; log $OUT/logs/$name.log"
  [ "$status" = ok ] || tail -n 5 "$OUT/logs/$name.log" | sed 's/^/   | /'
}

echo "gpu_suite on $GPU: results in $OUT"
if [ "$SMOKE" = 0 ]; then
  # limits: 80 + 75 + 130 + 40 + 120 + 15 + 15 s = 7.9 minutes at most
  step build 80 env NATIVEVIT_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
  step tests-cuda 75 "$PY" -m pytest -q -k cuda tests
else
  printf 'build\tskipped (smoke)\t0\n' >> "$STEPS"
  step tests-cuda 120 "$PY" -m pytest -q --collect-only -k cuda tests
fi
step kernels-bf16 130 "$PY" -m nativevit.cli kernels --device "$DEVICE" "${KERNEL_BF16[@]}" "${KERNEL_ITERS[@]}" \
  --out "$OUT"
step kernels-fp 40 "$PY" -m nativevit.cli kernels --device "$DEVICE" "${KERNEL_FP[@]}" "${KERNEL_ITERS[@]}" \
  --out "$OUT"
step encoder 120 "$PY" -m nativevit.cli bench --device "$DEVICE" "${ENCODER[@]}" ${COMPARE[@]+"${COMPARE[@]}"} --compile \
  --out "$OUT"
step plots 15 "$PY" benchmarks/plot_results.py --results "$OUT"
step summary 15 sh -c "\"$PY\" -m nativevit.bench.summary \"$OUT\" > \"$OUT/summary.md.tmp\" && mv \"$OUT/summary.md.tmp\" \"$OUT/summary.md\""

echo "gpu_suite: $(( $(date +%s) - SUITE_START ))s in all; summary $OUT/summary.md"
exit $FAILED
