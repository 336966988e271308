"""Our compiled train step against a plain data-parallel step of the same network.

The guard that sees absolute speed: `steps.train_step` (the recipe's adaptive
class-weighted sigmoid loss, colour distortion on the device, the finite guard,
L2 in the loss, the learning rate in the metrics) against the textbook step
written here, independently of the package: flax + optax SGD with momentum,
plain sigmoid cross-entropy, ``pmean`` of gradients and BN statistics. Same
network (`models/resnet.py`), shapes, dtype and devices; both compiled ahead
and fed one batch that stays on the devices, so only the programs differ.

Two comparisons, both printed:
- the compiled programs from XLA's cost and memory analysis (FLOPs and bytes
  accessed per image, temporaries, generated code): no clock, no noise;
- images/s, in alternating rounds (ours, plain, ours, plain, ...) of
  ``--steps`` steps each, so that a neighbour's load hits both alike; the
  ratio is the median of the per-round ratios (ours / the mean of the plain
  rounds on either side), with their spread.

A ratio below 0.9 means our extras (or a structural mistake, like the
one-trip scan around the network that once made the demo 5x slower) cost
more than the network's tenth; the compiled bytes and FLOPs say which.

  python benchmarks/step_vs_plain_bench.py              # demo shapes, ~2 min
  python benchmarks/step_vs_plain_bench.py --depth=101 --width=1 \\
      --image_size=224 --batch=256 --dtype=bfloat16 --num_classes=11166
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# The bare-step benchmark's network, config and pipeline-shaped batch (a
# script beside this).
from train_step_bench import (  # noqa: E402
    _random_batch, add_network_flags, network_config)

AXIS = "plain_batch"


def _config(args: argparse.Namespace):
  """The demo's shapes with the recipe's loss and colour distortion."""
  config = network_config(args)
  config.accumulate_steps = args.accumulate_steps
  return config


class Compiled:
  """A pmapped step compiled for a state and a batch kept on the devices."""

  def __init__(self, name: str, pmapped, state, batch):
    import jax  # pylint: disable=g-import-not-at-top
    self.name, self.state, self.batch = name, state, batch
    t0 = time.perf_counter()
    self.step = pmapped.lower(state, batch).compile()
    self.compile_seconds = time.perf_counter() - t0
    images = batch["image"].shape[0] * batch["image"].shape[1]
    cost = self.step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    devices = jax.local_device_count()
    self.flops = float(cost.get("flops", 0)) * devices / images
    self.bytes = float(cost.get("bytes accessed", 0)) * devices / images
    memory = self.step.memory_analysis()
    self.temp_mb = memory.temp_size_in_bytes / 1e6 if memory else float("nan")
    self.code_mb = (memory.generated_code_size_in_bytes / 1e6 if memory
                    else float("nan"))
    self.images = images
    self.run(2)  # Warm-up.

  def run(self, steps: int) -> float:
    """Images/s over `steps` steps."""
    import jax  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return steps * self.images / (time.perf_counter() - t0)


def ours(config, num_classes: int, batch) -> Compiled:
  # pylint: disable=g-import-not-at-top
  import jax
  from mlimages_jax.train import distributed
  from mlimages_jax.train import optimizer
  from mlimages_jax.train import schedule
  from mlimages_jax.train import state as state_lib
  from mlimages_jax.train import steps
  model = state_lib.create_model(config, num_classes)
  learning_rate_fn = schedule.create_learning_rate_fn(config)
  tx = optimizer.create_optimizer(config, learning_rate_fn)
  state = state_lib.create_train_state(jax.random.PRNGKey(0), model,
                                       config.image_size, tx)
  pmapped = steps.pmap_train_step(
      model, tx, config, optimizer.batch_norm_modules(state.batch_stats),
      learning_rate_fn)
  return Compiled("ours", pmapped, distributed.replicate(state), batch)


def plain(config, num_classes: int, batch) -> Compiled:
  """The textbook data-parallel step, written here on purpose."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import optax
  from mlimages_jax.train import state as state_lib
  model = state_lib.create_model(config, num_classes)
  tx = optax.sgd(0.01, momentum=0.9)
  size = config.image_size
  variables = jax.jit(lambda: model.clone(bn_axis_name=None).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))()
  state = (variables["params"], variables["batch_stats"],
           tx.init(variables["params"]))

  def step(state, batch):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      images = batch["image"].astype(jnp.float32) / 127.5 - 1.0
      (logits, _), new = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = optax.sigmoid_binary_cross_entropy(
          logits.astype(jnp.float32), batch["labels"]).sum(-1).mean()
      return loss, new["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    grads = jax.lax.pmean(grads, AXIS)
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    return ((optax.apply_updates(params, updates), batch_stats, opt_state),
            jax.lax.pmean(loss, AXIS))

  devices = jax.local_device_count()
  replicated = jax.tree.map(lambda x: jnp.stack([x] * devices), state)
  if config.model.sync_batch_norm:
    raise SystemExit("the plain step has per-device BN only")
  pmapped = jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))
  return Compiled("plain", pmapped, replicated, batch)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_network_flags(parser, batch=16)
  parser.add_argument("--num_classes", type=int, default=45)
  parser.add_argument("--accumulate_steps", type=int, default=1,
                      help="ours only: micro-batches per step")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()

  # pylint: disable=g-import-not-at-top
  import jax
  from mlimages_jax.train import distributed
  config = _config(args)
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), (distributed.AXIS_NAME,))
  sharding = jax.NamedSharding(mesh, jax.P(distributed.AXIS_NAME))
  batch = {k: jax.device_put(v, sharding) for k, v in
           _random_batch(config, args.num_classes, len(devices)).items()}
  plain_batch = {k: batch[k] for k in ("image", "labels")}
  print(f"{len(devices)} x {devices[0].device_kind}; ResNet-{args.depth} "
        f"width {args.width} at {args.image_size}px, global batch "
        f"{args.batch}, {args.dtype}, {args.num_classes} classes")
  steps = [ours(config, args.num_classes, batch),
           plain(config, args.num_classes, plain_batch)]
  for s in steps:
    print(f"{s.name:>5}: compiled in {s.compile_seconds:.1f} s; "
          f"{s.flops / 1e9:.4f} GFLOP/img, {s.bytes / 1e6:.2f} MB accessed/img,"
          f" temporaries {s.temp_mb:.1f} MB, code {s.code_mb:.2f} MB")
  ours_step, plain_step = steps
  print(f"compiled ours / plain: FLOPs x{ours_step.flops / plain_step.flops:.3f},"
        f" bytes x{ours_step.bytes / plain_step.bytes:.3f}, temporaries "
        f"x{ours_step.temp_mb / plain_step.temp_mb:.3f}")

  plain_rates = [plain_step.run(args.steps)]
  ours_rates, ratios = [], []
  for _ in range(args.rounds):
    ours_rates.append(ours_step.run(args.steps))
    plain_rates.append(plain_step.run(args.steps))
    ratios.append(ours_rates[-1] * 2 / (plain_rates[-2] + plain_rates[-1]))
  fmt = lambda rates: ", ".join(f"{r:,.1f}" for r in rates)
  print(f"ours  img/s by round: {fmt(ours_rates)}")
  print(f"plain img/s by round: {fmt(plain_rates)}")
  print(f"ours / plain by round: {', '.join(f'{r:.3f}' for r in ratios)} "
        f"(median {statistics.median(ratios):.3f}, "
        f"range {min(ratios):.3f}-{max(ratios):.3f})")
  print(json.dumps({
      "benchmark": "train_step_vs_plain",
      "value": round(statistics.median(ours_rates), 2), "unit": "images/s",
      "baseline": round(statistics.median(plain_rates), 2),
      "ratio": round(statistics.median(ratios), 4), "target": 0.9}))


if __name__ == "__main__":
  main()
