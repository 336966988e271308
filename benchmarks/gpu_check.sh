#!/usr/bin/env bash
# One prepared GPU check for any machine with an NVIDIA GPU (< 10 minutes with
# the venv in place; a first run also installs it, a few minutes more):
#  1. the bare compiled train step of ResNet-101, bf16, 224x224, 11,166
#     classes on ONE GPU: img/s and model-FLOPs utilisation (MFU), JSON line
#     "train_step" (target on one H200: >= 3,000 img/s);
#  2. the loop efficiency of the same network on the same GPU: the full
#     training loop (tf.data input with the recipe's augmentation on the host
#     CPUs, logging, asynchronous checkpoints) / the bare step, JSON line
#     "train_loop_efficiency" (target >= 0.95). It trains on
#     ml_images/synthetic (45 classes), built into a temporary directory.
#
#   bash benchmarks/gpu_check.sh            # BATCH=256 STEPS=50 by default
#   BATCH=512 bash benchmarks/gpu_check.sh
#
# Uses ./.venv (created and filled from requirements.txt if missing) and adds
# the CUDA build of the pinned jax if jax does not see a GPU yet.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${BATCH:-256}
STEPS=${STEPS:-50}

fail() { echo "gpu_check: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null \
  || fail "nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || fail "nvidia-smi sees no GPU"

# One GPU, most of its memory for XLA; TF (CPU build) stays off the GPU.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export TF_CPP_MIN_LOG_LEVEL=2

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import mlimages_jax, flax, optax, tensorflow_datasets" 2>/dev/null; then
  pip install -q -r requirements.txt -e .
fi
gpu_backend() { [ "$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null)" = gpu ]; }
if ! gpu_backend; then
  version=$(python -c 'import jax; print(jax.__version__)')
  # The CUDA 13 wheels need driver >= 580; older drivers get CUDA 12.
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
  if [ "${driver%%.*}" -ge 580 ]; then cudas="cuda13 cuda12"; else cudas="cuda12"; fi
  for cuda in $cudas; do
    if pip install -q "jax[${cuda}]==${version}" && gpu_backend; then break; fi
  done
  gpu_backend || fail "jax ${version} does not see the GPU after installing its CUDA wheels (driver ${driver})"
fi
python -c 'import jax; d = jax.devices()[0]; print("jax", jax.__version__, "on", d.device_kind)'

COMMON=(--depth=101 --width=1.0 --image_size=224 --dtype=bfloat16
        --batch="${BATCH}" --steps="${STEPS}" --device_cores=0)
echo "== 1/2 bare train step (11,166 classes)"
timeout 240 python benchmarks/train_step_bench.py "${COMMON[@]}" \
  --num_classes=11166 --loop_steps=0
echo "== 2/2 loop efficiency (ml_images/synthetic)"
timeout 300 python benchmarks/train_step_bench.py "${COMMON[@]}" \
  --loop_steps=150
