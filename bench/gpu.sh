#!/usr/bin/env bash
# What one GPU does, in under 8 minutes, with random weights and local folders only (nothing is downloaded):
#   1. images/s of stock diffusers StableDiffusionInpaintPipeline vs MAUGen at SD-1.5 size (512 px), batch
#      8/16/32, float16 and bfloat16, then with diffusers' attention cache (pab) and torch.compile (batch 16);
#   2. images/s of the detector panel (3 AU detectors + realism) on ONNX Runtime's CUDA provider, IO binding;
#   3. accepted samples/s of a short `factory build` of that SD-1.5-size MAUGen on this GPU, shared by the
#      generator and the detectors (fractional Ray GPUs).
# Each step has its own time limit (290 + 30 + 150 s): rows print as they are measured, a step that fails or
# runs out of time is reported and the next one runs; the exit status is 1 when any step did not finish.
#
#   bash bench/gpu.sh          a machine with an NVIDIA GPU, CUDA torch and onnxruntime-gpu (deploy/Dockerfile)
#   bash bench/gpu.sh --dry    (or MIFA_GPU_DRY=1) every step on the CPU at toy size, well under a minute;
#                              tests/test_gpu_bench.py runs it, so the script cannot rot
# Python: $PYTHON, else python. The step programs are bench/bench_gpu.py's subcommands.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=${MIFA_GPU_DRY:-0}
[[ "${1:-}" == "--dry" ]] && dry=1
py=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/mifa-gpu.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $dry == 1 ]]; then
  echo "bench/gpu.sh --dry: every step on the CPU at toy size (numbers mean nothing; the code paths run)"
  # one thread a process: toy tensors gain nothing from more, and on a busy machine threads wait on each other
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  gen=(--device cpu --shape toy --size 64 --steps 2 --batches 1 --dtypes float32,bfloat16 --variants base,pab
       --budget-s 600)
  det=(--device cpu --batches 8,16 --size 64 --seconds 0.3)
  bld=(--device cpu --dtype float32 --steps 2 --batch 2 --detect-batch 8 --target 2 --shard-size 2 --shards-in-flight 1
       --timeout 120)
  echo "compile: not run dry (dynamo alone traces the toy UNet for a minute on a CPU); the switch is covered by"
  echo "  tests/test_maugen_speed.py::test_compile_in_place_keeps_the_feature_taps (-m slow)"
else
  if ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "bench/gpu.sh: torch sees no CUDA device; install the CUDA torch wheel (deploy/Dockerfile), or run --dry" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  gen=(--device cuda --shape sd15 --size 512 --budget-s 200)
  det=(--device cuda --batches 64,256 --size 512 --seconds 5)
  bld=(--device cuda --dtype float16 --target 96 --shard-size 48 --timeout 140)
fi
start=$SECONDS
failed=0
step() {  # step LIMIT_S ARGS...: one bench_gpu.py step under its time limit; a failure is reported, the rest run
  local limit=$1 rc=0
  shift
  # stdin from /dev/null: timeout runs the step in a process group of its own, which the terminal would stop
  timeout --kill-after=10 "$limit" "$py" bench/bench_gpu.py "$@" </dev/null || rc=$?
  if ((rc != 0)); then
    failed=1
    if ((rc == 124)); then
      echo "bench/gpu.sh: step $1 stopped at its ${limit} s limit"
    else
      echo "bench/gpu.sh: step $1 failed (exit $rc)"
    fi
  fi
}
step 290 generator --work "$work" "${gen[@]}"
step 30 detectors "${det[@]}"
if [[ -d $work/maugen ]]; then
  step 150 build --checkpoint "$work/maugen" --out "$work/build" "${bld[@]}"
else
  echo "bench/gpu.sh: step build skipped: the generator step saved no checkpoint"
  failed=1
fi
echo "bench/gpu.sh: done in $((SECONDS - start)) s"
exit $failed
