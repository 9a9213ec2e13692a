#!/usr/bin/env bash
# GPU benchmark: cifar10 config at global batch 128 in f32 and bf16, plus sampling throughput.
# The bf16 step is also profiled: trace_train_bfloat16.json.gz, read with
# `python bench/trace_summary.py TRACE --steps 3` (gpu_log.txt has the summary).
# Fits in ~8 minutes on one H100/H200; needs no network (JAX, Flax, Optax, chex present there;
# ml_collections travels as a wheel in .whl/: fetch it here first with
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps -d .whl ml_collections==1.1.0
# and name .whl in the device tool's carry). Synthetic batches: no tensorflow.
#   bash bench/gpu.sh            # results in $OUT (if set) or bench/out/: gpu.json, gpu_log.txt
#   bash bench/gpu.sh --loop     # the real training loop on cifar10:h100 beside the bare step (bench/loop.py):
#                                # steps/s, MFU, device memory -> loop.json, loop_log.txt. It imports the whole
#                                # package (Orbax, tfds, ...): what the machine lacks travels as wheels in .whl/, e.g.
#   python3 -m pip download -d .whl ml_collections==1.1.0 orbax-checkpoint tensorflow-datasets tensorboardX
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/bench_site \
    .whl/ml_collections-*.whl || { echo "ml_collections is missing: see the header of $0" >&2; exit 1; }
  export PYTHONPATH=/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
  --format=csv 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
export PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--loop" ]]; then
  shift
  if ! "$PY" -c "import ddpm_jax.training.loop" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links .whl --no-build-isolation -e . \
      || { echo "the package's dependencies are missing: see the header of $0" >&2; exit 1; }
  fi
  timeout 480 "$PY" bench/loop.py --configs cifar10:h100 --batch 0 --steps 100 --warmup 10 \
    --out "$OUT_DIR/loop.json" "$@" 2>&1 | tee "$OUT_DIR/loop_log.txt"
  exit "${PIPESTATUS[0]}"
fi
# The script skips what no longer fits its own --budget-s; the outer timeout is the hard stop.
timeout 480 "$PY" bench/gpu_bench.py --out "$OUT_DIR/gpu.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_log.txt"
