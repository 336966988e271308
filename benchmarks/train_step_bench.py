"""Training throughput: the bare compiled train step and the full loop's share.

Two rates, same model, batch and devices, measured in the same run:
- bare step: the pmapped `train.train_step` fed one batch that already sits
  on the devices, timed over ``--steps`` steps after compilation (the ceiling);
- full loop: `train.train_and_evaluate` on ``ml_images/synthetic`` (built if
  missing): input pipeline with augmentation, host-to-device transfer, metric
  logging and asynchronous checkpoints; its rate is read from the
  ``images_per_sec`` lines of ``metrics.jsonl`` after the first interval
  (which includes compilation).
Loop efficiency = full loop rate / bare step rate (target >= 0.95).
Also printed: model FLOPs per image (XLA cost analysis of one train step) and,
on a known accelerator, the model-FLOPs utilisation (MFU).

  python benchmarks/train_step_bench.py                    # CPU, ~2-3 minutes
  python benchmarks/train_step_bench.py --depth=101 --image_size=224 \
      --batch=256 --dtype=bfloat16 --steps=50 --loop_steps=0   # one GPU
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from mlimages_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import pretrain  # noqa: E402

# Dense bf16 peak FLOP/s per device (vendor datasheets), for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12,
              "L4": 121e12, "A10": 125e12, "V100": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12}


def _peak_flops(device: jax.Device, override: float) -> float | None:
  if override:
    return override * 1e12
  kind = device.device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return flops
  return None


def _config(args: argparse.Namespace, workdir: str):
  config = pretrain.get_config("demo")
  config.model.depth = args.depth
  config.model.width_multiplier = args.width
  config.image_size = args.image_size
  config.batch_size = args.batch
  config.schedule.reference_batch_size = args.batch
  config.dtype = args.dtype
  config.num_train_steps = args.loop_steps
  config.log_every_steps = args.log_every
  config.checkpoint_every_steps = max(args.loop_steps // 2, 1)
  config.eval_at_start = False
  config.num_eval_examples = config.eval_batch_size  # Minimal final eval.
  config.data_dir = args.data_dir
  return config


def bare_step(args: argparse.Namespace, config) -> tuple[float, float]:
  """(images/s, FLOPs per image) of the compiled step on on-device data."""
  num_classes = args.num_classes
  model = train.create_model(config, num_classes)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config))
  state = train.create_train_state(jax.random.PRNGKey(0), config, model,
                                   config.image_size, tx)
  step = train.pmap_train_step(model, tx, config,
                               train.batch_norm_modules(state.batch_stats))
  devices = jax.local_device_count()
  per_device = config.batch_size // devices
  rng = np.random.default_rng(0)
  host = {
      "image": rng.integers(0, 256, (devices, per_device, config.image_size,
                                     config.image_size, 3), dtype=np.uint8),
      "labels": (rng.random((devices, per_device, num_classes)) < 0.01
                 ).astype(np.float32),
      "mask": np.ones((devices, per_device), np.float32)}
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (train.AXIS_NAME,))
  sharding = jax.NamedSharding(mesh, jax.P(train.AXIS_NAME))
  batch = {k: jax.device_put(v, sharding) for k, v in host.items()}
  state = train.replicate(state)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_image = float(cost.get("flops", 0.0)) * devices / config.batch_size
  for _ in range(args.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  return args.steps * config.batch_size / seconds, flops_per_image


def full_loop(config, workdir: str) -> float:
  train.train_and_evaluate(config, workdir)
  rates = [line["images_per_sec"] for line in map(
      json.loads, (pathlib.Path(workdir) / train.METRICS_FILE).read_text()
      .splitlines()) if "images_per_sec" in line][1:]
  if not rates:
    raise SystemExit("--loop_steps must cover at least two log intervals")
  return float(np.mean(rates))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=26)
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=64,
                      help="global batch (all local devices)")
  parser.add_argument("--dtype", default="float32",
                      choices=sorted(train.DTYPES))
  parser.add_argument("--num_classes", type=int, default=45,
                      help="head size of the bare step (45 = synthetic; "
                      "11166 = ML-Images)")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--loop_steps", type=int, default=120,
                      help="steps of the full loop (0: bare step only)")
  parser.add_argument("--log_every", type=int, default=20)
  parser.add_argument("--data_dir", default="",
                      help="TFDS data dir for ml_images/synthetic")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak for MFU (default: from device kind)")
  args = parser.parse_args()

  device = jax.local_devices()[0]
  print(f"devices: {jax.local_device_count()} x {device.device_kind}; "
        f"ResNet-{args.depth} width {args.width} at {args.image_size}px, "
        f"global batch {args.batch}, {args.dtype}")
  with tempfile.TemporaryDirectory() as workdir:
    config = _config(args, workdir)
    bare, flops = bare_step(args, config)
    print(f"bare compiled step: {bare:,.1f} img/s; model FLOPs "
          f"{flops / 1e9:.3f} GFLOP/img (forward+backward)")
    peak = _peak_flops(device, args.peak_tflops)
    ceiling = peak * jax.local_device_count() / flops if peak else None
    if ceiling:
      print(f"MFU: {100 * bare / ceiling:.1f}% of {peak / 1e12:.0f} TFLOP/s "
            f"per device (100% would be {ceiling:,.0f} img/s)")
    if args.loop_steps:
      config.data_dir = args.data_dir or str(pathlib.Path(workdir) / "tfds")
      loop = full_loop(config, str(pathlib.Path(workdir) / "run"))
      ratio = loop / bare
      print(f"full training loop: {loop:,.1f} img/s; loop efficiency "
            f"{ratio:.3f} (target >= 0.95)")
      print(json.dumps({"benchmark": "train_loop_efficiency",
                        "value": round(loop, 2), "unit": "images/s",
                        "baseline": round(bare, 2),
                        "ratio": round(ratio, 4), "target": 0.95}))
    else:
      # Baseline: the rate at 100% model-FLOPs utilisation; ratio = MFU.
      print(json.dumps({
          "benchmark": "train_step", "value": round(bare, 2),
          "unit": "images/s",
          "baseline": round(ceiling, 2) if ceiling else None,
          "ratio": round(bare / ceiling, 4) if ceiling else None,
          "target": 3000}))


if __name__ == "__main__":
  main()
