#!/usr/bin/env bash
# One prepared GPU check for any machine with an NVIDIA GPU (< 10 minutes):
# the bare compiled train step of ResNet-101, bf16, 224x224, 11,166 classes on
# ONE GPU; prints img/s and the model-FLOPs utilisation (MFU), then the JSON
# line of benchmarks/train_step_bench.py. Target on one H200: >= 3,000 img/s.
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

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import mlimages_jax, flax, optax, tensorflow_datasets" 2>/dev/null; then
  pip install -q -r requirements.txt -e .
fi
if [ "$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null)" != "gpu" ]; then
  version=$(python -c 'import jax; print(jax.__version__)')
  pip install -q "jax[cuda12]==${version}" || pip install -q "jax[cuda13]==${version}"
fi
python -c 'import jax; d = jax.devices()[0]; assert d.platform == "gpu", d; print("jax", jax.__version__, "on", d.device_kind)'

# One GPU, most of its memory for XLA; TF (CPU build) stays off the GPU.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export TF_CPP_MIN_LOG_LEVEL=2
timeout 480 python benchmarks/train_step_bench.py \
  --depth=101 --width=1.0 --image_size=224 --dtype=bfloat16 \
  --num_classes=11166 --batch="${BATCH}" --steps="${STEPS}" --warmup=5 \
  --loop_steps=0
