#!/usr/bin/env bash
# Step time (and memory) of tf_dpsat on one GPU: the same harness as on CPU,
# benchmarks/step_time.py, with XLA off and on at batch sizes 256 and 1024.
#
# Run from the repository root (or anywhere):   bash benchmarks/accelerator.sh
#
# Writes under "${OUT:-benchmarks/results}":
#   step_time_gpu_xla_off.json  timing of every model/batch/mode, XLA off
#   step_time_gpu_xla_on.json   the same with jit_compile=True
#   step_time_gpu_xla_*.png     ratio charts
#   step_time_gpu_memory.json   peak host RSS and peak GPU memory (TensorFlow's
#                               allocator) of each mode, one process each
#   gpu.txt, *.log              nvidia-smi, the preflight and the harness logs
# Each JSON is rewritten after every model/batch group, so a phase cut short
# by its time limit keeps what it finished ("complete": false).
#
# Time: under 8 minutes in total (45 + 110 + 140 + 120 s of phase budgets;
# every phase runs under `timeout`, SIGINT then SIGKILL 15 s later). A pair
# whose warm-up step takes over 10 s, or that XLA recompiles on every call,
# is reported as not timed. Override the budgets with
# PREFLIGHT_S, XLA_OFF_S, XLA_ON_S and MEMORY_S, the settings with MODELS,
# BATCH_SIZES, ROUNDS, STEPS, MEMORY_MODELS, MEMORY_BATCH_SIZES, MEMORY_JIT,
# and the clipping path with CLIPPING (passed as --clipping only when set,
# e.g. CLIPPING=vectorized for the plain per-example path).
#
# Requirements (nothing is downloaded): python3 with a CUDA build of
# TensorFlow 2.21, Keras 3.15, numpy, absl-py and matplotlib. If a folder
# .whl/ holds wheels at the repository root they are installed first into
# /tmp/site (no index, no dependencies) and put on PYTHONPATH. That is how
# small missing packages (keras and what it needs: absl-py, namex, optree,
# ml-dtypes, h5py, rich) reach a machine without network, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl keras==3.15.1
# A TensorFlow GPU wheel (hundreds of MB, plus the CUDA libraries) is far too
# big to carry that way; on a machine without TensorFlow the preflight stops
# the script with exit code 3 and a message in preflight.log.
# Exit code: 0 when every phase finished, otherwise the first failing phase's
# code (124 for a phase that ran out of time). ALLOW_CPU=1 lets it run
# without a GPU (a dry run of the plumbing, e.g. MODELS=tiny).

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "${OUT_DIR}"
PYTHON="${PYTHON:-python3}"
PREFLIGHT_S="${PREFLIGHT_S:-45}"
XLA_OFF_S="${XLA_OFF_S:-110}"
XLA_ON_S="${XLA_ON_S:-140}"
MEMORY_S="${MEMORY_S:-120}"
MODELS="${MODELS:-mlp,tb_cnn}"
BATCH_SIZES="${BATCH_SIZES:-256,1024}"
ROUNDS="${ROUNDS:-5}"
STEPS="${STEPS:-5}"
MEMORY_MODELS="${MEMORY_MODELS:-tb_cnn}"
MEMORY_BATCH_SIZES="${MEMORY_BATCH_SIZES:-1024}"
MEMORY_JIT="${MEMORY_JIT:-on}"
CLIPPING_FLAG=()
if [[ -n "${CLIPPING:-}" ]]; then
  CLIPPING_FLAG=("--clipping=${CLIPPING}")
fi

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export KERAS_BACKEND=tensorflow
# Grow GPU memory on demand instead of reserving it all up front.
export TF_FORCE_GPU_ALLOW_GROWTH=true
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

bounded() {  # bounded SECONDS COMMAND... : run COMMAND under a time limit.
  local seconds="$1"
  shift
  timeout --signal=INT --kill-after=15 "${seconds}" "$@"
}

if compgen -G ".whl/*.whl" > /dev/null; then
  "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv > "${OUT_DIR}/gpu.txt" 2>&1 || echo "no nvidia-smi" > "${OUT_DIR}/gpu.txt"

preflight_rc=0
bounded "${PREFLIGHT_S}" "${PYTHON}" - > "${OUT_DIR}/preflight.log" 2>&1 <<'EOF' || preflight_rc=$?
import os
import sys
try:
    import tensorflow as tf
    import keras
    import tf_dpsat
except ImportError as error:
    print(f"PREFLIGHT FAILED: {error}. This machine has no usable TensorFlow/"
          "Keras; see the header of benchmarks/accelerator.sh.")
    sys.exit(3)
gpus = tf.config.list_physical_devices("GPU")
print("tensorflow", tf.__version__, "keras", keras.__version__,
      "cuda build", tf.test.is_built_with_cuda(), "gpus", gpus)
if not gpus and os.environ.get("ALLOW_CPU") != "1":
    print("PREFLIGHT FAILED: TensorFlow sees no GPU (ALLOW_CPU=1 to go on).")
    sys.exit(3)
EOF
cat "${OUT_DIR}/preflight.log"
if [[ "${preflight_rc}" -ne 0 ]]; then
  exit "${preflight_rc}"
fi

status=0
phase() {  # phase NAME SECONDS ARGS... : one bounded harness run.
  local name="$1" seconds="$2" rc=0
  shift 2
  bounded "${seconds}" "${PYTHON}" -m benchmarks.step_time "$@" \
    ${CLIPPING_FLAG[@]+"${CLIPPING_FLAG[@]}"} \
    --output_json="${OUT_DIR}/step_time_gpu_${name}.json" \
    > "${OUT_DIR}/${name}.log" 2>&1 || rc=$?
  grep -E '^\||^total' "${OUT_DIR}/${name}.log" || tail -n 20 "${OUT_DIR}/${name}.log"
  echo "phase ${name}: exit code ${rc}"
  if [[ "${status}" -eq 0 && "${rc}" -ne 0 ]]; then
    status="${rc}"
  fi
}

# XLA off and on in separate processes: a slow XLA compilation cannot cost
# the other setting its numbers. Each JSON is rewritten after every group.
# --no-isolate: the groups share one process (a CUDA start-up per group
# would eat the budget; OOM is not a concern with these models on a GPU).
phase xla_off "${XLA_OFF_S}" --models="${MODELS}" \
  --batch_sizes="${BATCH_SIZES}" --jit=off --rounds="${ROUNDS}" \
  --steps="${STEPS}" --warmup=3 --max_step_s=10 --no-memory --no-isolate \
  --plot="${OUT_DIR}/step_time_gpu_xla_off.png"
phase xla_on "${XLA_ON_S}" --models="${MODELS}" \
  --batch_sizes="${BATCH_SIZES}" --jit=on --rounds="${ROUNDS}" \
  --steps="${STEPS}" --warmup=3 --max_step_s=10 --no-memory --no-isolate \
  --plot="${OUT_DIR}/step_time_gpu_xla_on.png"
phase memory "${MEMORY_S}" --no-timing --models="${MEMORY_MODELS}" \
  --batch_sizes="${MEMORY_BATCH_SIZES}" --jit="${MEMORY_JIT}" \
  --memory_steps=3 --memory_timeout_s=60
exit "${status}"
