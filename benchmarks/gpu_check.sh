#!/usr/bin/env bash
# The GPU check of issue 14, as it is: about 5 minutes on one H200, ONE JSON file out.
#
#   bash benchmarks/gpu_check.sh                  # writes $OUT/gpu_check.json (default OUT: benchmarks/out/)
#   SIMCLR_GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # CPU, tiny sizes, every part's code path (tests use it)
#
# Parts (each under its own timeout; one that fails or times out is recorded with its error and the
# rest still run; the JSON is written whatever happens):
#   probe                              machine, torch, GPU
#   cuda_tests                         pytest -m cuda (tests/cuda), per-test outcomes from the junit XML
#   throughput_resnet18_cifar_32px     pretrain_throughput.py: model-only limit and full loop, B=512, bf16
#   throughput_resnet50_224px_jpeg     the same for resnet50 at 224 px, read from JPEGs every step
#   epoch_cifar10                      the cifar10 recipe over 50k in-memory images, two epochs timed
#   settings                           channels_last, cudnn.benchmark, bf16, compile, DDP options, H2D copy
#   grad_cache_max_batch               resnet50 224 px: largest batch that fits, with and without the cache
#   jpeg_decode                        224 px views: nvJPEG batches on the GPU vs CPU decoding in 8 DataLoader
#                                      workers, both feeding the batched augmentation (decode_speed.py device)
#
# Data travels in benchmarks/.cache/ (git-ignored; ../shared is not on the GPU machine):
#   mkdir -p benchmarks/.cache && cp ../shared/data/{cifar10-jpeg,imagenette-subset}.tar.gz benchmarks/.cache/
# and name both files in the device call's carry (57 MiB together). Without them the epoch uses
# synthetic pixels and the JPEG row is recorded as skipped.
#
# Environment: OUT (output folder), PYTHON (default: .venv/bin/python if present, else python3),
# GPU_CHECK_BUDGET (seconds for all parts, default 420), SIMCLR_GPU_CHECK_DRY=1,
# SIMCLR_GPU_CHECK_PARTS (comma-separated subset of the parts above; the others are recorded as skipped),
# SIMCLR_GPU_CHECK_JPEG_ROOT (a folder of class folders of JPEGs, instead of the Imagenette subset).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/benchmarks/out}
mkdir -p "$OUT"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DRY=${SIMCLR_GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-420}
SELECTED=${SIMCLR_GPU_CHECK_PARTS:-}
JPEG_ROOT=${SIMCLR_GPU_CHECK_JPEG_ROOT:-}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$(date +%s)
RESULT="$OUT/gpu_check.json"

assemble() {
  local rc=$?
  "$PYTHON" benchmarks/gpu_parts.py assemble --work "$WORK" --out "$RESULT" \
    || echo '{"error": "assembling the parts failed; see the log above"}' >"$RESULT"
  echo "gpu_check: wrote $RESULT ($(($(date +%s) - START)) s)" >&2
  rm -rf "$WORK"
  exit "$rc"
}
trap assemble EXIT

if [[ $DRY == 1 ]]; then DEVICE=cpu; else DEVICE=cuda; fi
printf '{"dry": %s, "budget_seconds": %s, "started_utc": "%s", "git_commit": "%s"}\n' \
  "$([[ $DRY == 1 ]] && echo true || echo false)" "$BUDGET" "$(date -u +%FT%TZ)" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$WORK/meta.json"

# run_part NAME LIMIT_SECONDS COMMAND...: the command's output goes to WORK/NAME.log, its exit status,
# seconds and limit to WORK/NAME.status; it writes its result to WORK/NAME.json itself.
run_part() {
  local name=$1 limit=$2
  shift 2
  if [[ -n $SELECTED && ",$SELECTED," != *",$name,"* ]]; then
    echo "not selected (SIMCLR_GPU_CHECK_PARTS=$SELECTED)" >"$WORK/$name.skip"
    return 0
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 10)); then
    echo "no time left of GPU_CHECK_BUDGET=$BUDGET s" >"$WORK/$name.skip"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "gpu_check: $name (at most $limit s)" >&2
  local t0 rc=0
  t0=$(date +%s)
  GPU_CHECK_PART_LIMIT=$limit timeout -k 15 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  echo "$rc $(($(date +%s) - t0)) $limit" >"$WORK/$name.status"
  ((rc == 0)) || echo "gpu_check: $name failed (exit $rc); its log tail goes into the JSON" >&2
  return 0
}

dry=()
[[ $DRY == 1 ]] && dry=(--dry)

run_part probe 60 "$PYTHON" benchmarks/gpu_parts.py probe "${dry[@]}" --out "$WORK/probe.json"

# The cuda tests; the junit XML becomes the part's result even when tests fail (pytest exits 1).
cuda_tests() {
  local rc=0
  "$PYTHON" -m pytest -m cuda tests/cuda -q -rs -p no:cacheprovider --junitxml="$WORK/cuda_tests.xml" || rc=$?
  "$PYTHON" benchmarks/gpu_parts.py junit --xml "$WORK/cuda_tests.xml" --out "$WORK/cuda_tests.json"
  return "$rc"
}
export -f cuda_tests
export PYTHON WORK
run_part cuda_tests 150 bash -c cuda_tests

jpeg=()
[[ -n $JPEG_ROOT ]] && jpeg=(--jpeg-root "$JPEG_ROOT")
if [[ $DRY == 1 ]]; then
  r18=(--smoke --skip b,d)
  r50=(--smoke --skip b,d --data jpeg --image-size 32 --backends batched)
else
  r18=(--backbone resnet18 --cifar-stem --image-size 32 --batch 512 --bf16 --channels-last
       --steps 30 --warmup 5 --workers 8 --skip b,d)
  r50=(--backbone resnet50 --image-size 224 --batch 256 --bf16 --channels-last --data jpeg
       --steps 20 --warmup 5 --workers 14 --skip b,d)
fi
run_part throughput_resnet18_cifar_32px 90 "$PYTHON" benchmarks/pretrain_throughput.py --device "$DEVICE" \
  "${r18[@]}" --out "$WORK/throughput_resnet18_cifar_32px.json"
run_part throughput_resnet50_224px_jpeg 120 "$PYTHON" benchmarks/pretrain_throughput.py --device "$DEVICE" \
  "${r50[@]}" "${jpeg[@]}" --out "$WORK/throughput_resnet50_224px_jpeg.json"

if [[ $DRY == 1 ]]; then epoch=(--workers 0); else epoch=(--workers 8 --channels-last); fi
run_part epoch_cifar10 120 "$PYTHON" benchmarks/gpu_parts.py epoch "${dry[@]}" "${epoch[@]}" \
  --out "$WORK/epoch_cifar10.json"

# data.decode="gpu" against CPU decoding in DataLoader workers (issue 13); needs the Imagenette archive.
if [[ $DRY == 1 ]]; then dec=(--device cpu --smoke); else dec=(--device cuda --workers 8 --batch 256); fi
run_part jpeg_decode 90 "$PYTHON" benchmarks/decode_speed.py device "${dec[@]}" \
  --tar benchmarks/.cache/imagenette-subset.tar.gz --out "$WORK/jpeg_decode.json"

# Each Python part below stops starting new measurements 25 s before its timeout (GPU_CHECK_PART_LIMIT)
# and rewrites its JSON after each one, so a kill keeps what was measured.
run_part grad_cache_max_batch 110 "$PYTHON" benchmarks/gpu_parts.py gradcache "${dry[@]}" --seconds 85 \
  --out "$WORK/grad_cache_max_batch.json"
run_part settings 110 "$PYTHON" benchmarks/gpu_parts.py settings "${dry[@]}" --seconds 85 \
  --out "$WORK/settings.json"
