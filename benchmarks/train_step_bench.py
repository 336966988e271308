"""Training throughput: the bare compiled train step and the full loop's share.

Loop efficiency = the full training loop's step rate / the bare compiled step's
rate, both measured in this run, on the same model, batch and devices:

- bare step: the pmapped `steps_lib.train_step`, fed one real batch of the input
  pipeline (same shapes and keys as in the loop, so the same program, colour
  augmentation included) that already sits on the devices; ``--steps`` steps
  after compilation. The ceiling: no input, no host work, no syncs.
- full loop: `loop.train_and_evaluate` on ``ml_images/synthetic`` (built if
  missing) with the recipe's loss (§7 adaptive sigmoid) and augmentation
  (crops, flips, rotations; colour on the device), host-to-device transfers,
  metric logging every ``--log_every`` (50) steps and asynchronous Orbax
  checkpoints every ``--checkpoint_every`` (100) steps: twice the recipe's
  logging rate and 20 times its checkpoint rate (100 and 2,000 steps), so
  the per-event costs weigh more here than in a real run. The loop is
  measured from the end of its first logging interval (compilation, pipeline
  warm-up) to its last step, between the progress lines it logs right after
  waiting for the devices: the default 150 steps measure 100 steps with one
  checkpoint save and the logging inside the window. The final checkpoint
  and evaluation are outside it (one-off costs, like compilation).
- rounds: bare, loop, bare, loop, ..., bare. Each loop is compared with the
  mean of the two bare measurements around it (``--rounds``, default 1).

On an accelerator (``--device_cores=0``) the rates are wall-clock rates. CPU
runs emulate an accelerator (``--device_cores``, by default 1 when no
accelerator plugin is installed). On a GPU/TPU host the input pipeline and the
Python loop run on host cores while the device computes; on a CPU-only machine
they would compete with XLA for the same cores, and the ratio would measure
core sharing, not the loop (as did the 0.67 this benchmark used to report:
one unpinned wall-clock run on 2 shared cores). So before JAX starts, the
process is restricted to the first N cores, where XLA's CPU client creates
its compute threads (the "device"); then the main thread moves to the other
cores, where tf.data, Orbax, the metric writers and the Python loop create
theirs (the "host"). Both rates are measured under this split.

Device time (one emulated core, Linux): on a machine shared with other jobs
the wall-clock rates swing by +-30% from one measurement to the next, more
than the effect measured. So the headline ratio (the JSON line) divides
images by the device's own time: the CPU time of its threads plus the time
they were idle (neither running nor waiting to run), read from
``/proc/self/task/*/schedstat``. Time the device threads spent waiting for
the core behind other processes is left out; time they idled because the
loop did not feed them is kept, so input stalls and sync bubbles still lower
the ratio (logging every step and checkpointing every 2 steps gives 0.93,
measured). Both wall-clock and device-time figures are printed.

What the ratio means: the share of the device's step rate that the training
loop keeps, i.e. the cost of per-step host work, host-device syncs (logging,
checkpoints), input stalls and transfers. What it does not: absolute
accelerator speed (see ``gpu_check.sh``), PCIe/DMA bandwidth, or whether a
real host's cores can feed a real accelerator (here 1 host core feeds a
1-core "device" ~20x slower than a GPU). Other processes slowing the host
core still count against the loop, so on a busy machine the ratio errs low.

  python benchmarks/train_step_bench.py                    # CPU, ~3 minutes
  python benchmarks/train_step_bench.py --depth=101 --width=1 --image_size=224 \
      --batch=256 --dtype=bfloat16 --num_classes=11166 --loop_steps=0  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import pretrain  # noqa: E402

# Dense bf16 peak FLOP/s per device (vendor datasheets), for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12,
              "V100": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12}
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin",
                       "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def split_cores(device_cores: int) -> tuple[set[int], set[int]]:
  """Pins XLA's CPU client to `device_cores` cores, this thread to the rest.

  Must run before JAX creates its CPU client (threads inherit the affinity
  of the thread that creates them, and XLA sizes its pools from it).
  """
  cores = sorted(os.sched_getaffinity(0))
  if not 0 < device_cores < len(cores):
    raise SystemExit(f"--device_cores={device_cores} needs at least one more "
                     f"core than that; this process may use {len(cores)}")
  device, host = set(cores[:device_cores]), set(cores[device_cores:])
  os.sched_setaffinity(0, device)
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()  # Creates the clients and their threads.
  os.sched_setaffinity(0, host)
  if backend != "cpu":
    raise SystemExit(f"--device_cores emulates an accelerator on the CPU "
                     f"backend, but JAX runs on {backend}: pass "
                     f"--device_cores=0")
  return device, host


@dataclasses.dataclass(frozen=True)
class Sample:
  """Wall clock, and CPU / run-queue seconds of the device's threads."""
  wall: float
  run: float = 0.0
  wait: float = 0.0


@dataclasses.dataclass(frozen=True)
class Phase:
  """`images` trained between two samples."""
  images: int
  start: Sample
  end: Sample

  @property
  def wall_rate(self) -> float:
    return self.images / (self.end.wall - self.start.wall)

  @property
  def device_rate(self) -> float:
    """Images per second of device time: CPU time of its threads plus the
    time they had nothing to do (neither ran nor waited to run).

    Time spent waiting for the core behind other processes is left out, so
    the figure is what the device core would do alone; idle gaps (the loop
    not feeding the device) stay in.
    """
    run = self.end.run - self.start.run
    demand = run + self.end.wait - self.start.wait
    idle = max(self.end.wall - self.start.wall - demand, 0.0)
    return self.images / (run + idle)


class DeviceClock:
  """Samples the emulated device's threads from /proc (Linux schedstat)."""

  def __init__(self, cores: set[int] | None):
    # One core: its threads never run in parallel, so CPU time is busy time.
    self.enabled = bool(cores) and len(cores) == 1 and os.path.exists(
        "/proc/self/schedstat")
    self._cores = cores

  def now(self) -> Sample:
    wall, run, wait = time.perf_counter(), 0, 0
    if self.enabled:
      for tid in os.listdir("/proc/self/task"):
        try:
          if os.sched_getaffinity(int(tid)) != self._cores:
            continue
          with open(f"/proc/self/task/{tid}/schedstat") as f:
            ran, waited, _ = map(int, f.read().split())
        except OSError:  # The thread has just ended.
          continue
        run, wait = run + ran, wait + waited
    return Sample(wall, run / 1e9, wait / 1e9)


class ProgressSampler(logging.Handler):
  """Samples the clock at the loop's progress lines, which it logs right
  after waiting for the devices: the ends of its logging intervals."""

  def __init__(self, clock: DeviceClock):
    super().__init__(logging.INFO)
    self._clock = clock
    self.samples: list[tuple[int, Sample]] = []

  def emit(self, record: logging.LogRecord) -> None:
    if str(record.msg).startswith("step %d/%d"):
      self.samples.append((record.args[0], self._clock.now()))

  @contextlib.contextmanager
  def listening(self):
    """Receives the root logger's INFO records; other handlers print only
    warnings, as before."""
    root = logging.getLogger()
    saved = root.level, [(h, h.level) for h in root.handlers]
    for handler in root.handlers:
      handler.setLevel(max(handler.level, logging.WARNING))
    root.setLevel(logging.INFO)
    root.addHandler(self)
    try:
      yield self
    finally:
      root.removeHandler(self)
      root.setLevel(saved[0])
      for handler, level in saved[1]:
        handler.setLevel(level)


def _peak_flops(device, override: float) -> float | None:
  if override:
    return override * 1e12
  kind = device.device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return flops
  return None


def network_config(args: argparse.Namespace):
  """The demo's data with the recipe's loss and augmentation, at the
  network and batch of `add_network_flags`."""
  recipe = pretrain.get_config()
  config = pretrain.get_config("demo")
  config.loss = recipe.loss
  config.preprocess = recipe.preprocess
  config.model.depth = args.depth
  config.model.width_multiplier = args.width
  config.image_size = args.image_size
  config.batch_size = args.batch
  config.schedule.reference_batch_size = args.batch
  config.dtype = args.dtype
  return config


def _config(args: argparse.Namespace):
  """`network_config` run as a training loop of `--loop_steps`."""
  config = network_config(args)
  config.num_train_steps = max(args.loop_steps, 1)
  config.log_every_steps = args.log_every
  config.checkpoint_every_steps = args.checkpoint_every
  config.eval_at_start = False
  config.num_eval_examples = config.eval_batch_size  # Minimal final eval.
  return config


def _random_batch(config, num_classes: int,
                  devices: int) -> dict[str, np.ndarray]:
  """A batch shaped like the pipeline's (uint8 pixels, 1% positive labels,
  per-image colour parameters: each colour order a third of the images)."""
  from mlimages_jax.inputs import preprocessing  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shape = (devices, config.batch_size // devices)
  colour = np.tile(np.array([[0, 0, 1, 0, 1], [1, 0.05, 1.2, 0.02, 0.9],
                             [2, -0.05, 0.8, -0.02, 1.1]], np.float32),
                   (config.batch_size // 3 + 1, 1))[:config.batch_size]
  assert colour.shape[-1] == preprocessing.COLOUR_PARAMS
  return {
      "image": rng.integers(0, 256, (*shape, config.image_size,
                                     config.image_size, 3), dtype=np.uint8),
      "labels": (rng.random((*shape, num_classes)) < 0.01).astype(np.float32),
      "mask": np.ones(shape, np.float32),
      "colour": colour.reshape(*shape, -1)}


class BareStep:
  """The compiled train step on one batch that stays on the devices."""

  def __init__(self, config, host_batch: dict[str, np.ndarray],
               num_classes: int):
    # pylint: disable=g-import-not-at-top
    import jax
    from mlimages_jax.train import distributed
    from mlimages_jax.train import optimizer as optimizer_lib
    from mlimages_jax.train import schedule as schedule_lib
    from mlimages_jax.train import state as state_lib
    from mlimages_jax.train import steps as steps_lib
    model = state_lib.create_model(config, num_classes)
    learning_rate_fn = schedule_lib.create_learning_rate_fn(config)
    tx = optimizer_lib.create_optimizer(config, learning_rate_fn)
    state = state_lib.create_train_state(jax.random.PRNGKey(0), model,
                                         config.image_size, tx)
    step = steps_lib.pmap_train_step(
        model, tx, config, optimizer_lib.batch_norm_modules(state.batch_stats),
        learning_rate_fn)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()),
                             (distributed.AXIS_NAME,))
    sharding = jax.NamedSharding(mesh, jax.P(distributed.AXIS_NAME))
    self._batch = {k: jax.device_put(v, sharding)
                   for k, v in host_batch.items()}
    self._state = distributed.replicate(state)
    self.batch_size = config.batch_size
    # Run what was compiled here (calling `step` would compile it again).
    self._step = step.lower(self._state, self._batch).compile()
    cost = self._step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops_per_image = (float(cost.get("flops", 0.0))
                            * jax.local_device_count() / config.batch_size)

  def measure(self, steps: int, clock: DeviceClock) -> Phase:
    """`steps` steps after one more (the first call also warms up)."""
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(self._run(1))
    start = clock.now()
    jax.block_until_ready(self._run(steps))
    return Phase(steps * self.batch_size, start, clock.now())

  def _run(self, steps: int):
    for _ in range(steps):
      self._state, metrics = self._step(self._state, self._batch)
    return self._state, metrics


def measure_loop(config, workdir: pathlib.Path, clock: DeviceClock) -> Phase:
  """`train_and_evaluate` from the end of its first logging interval to its
  last step."""
  from mlimages_jax.train import loop  # pylint: disable=g-import-not-at-top
  with ProgressSampler(clock).listening() as sampler:
    loop.train_and_evaluate(config, workdir)
  if len(sampler.samples) < 2:
    raise SystemExit(f"--loop_steps must cover at least two logging "
                     f"intervals; the loop logged steps "
                     f"{[step for step, _ in sampler.samples]}")
  (first, start), (last, end) = sampler.samples[0], sampler.samples[-1]
  return Phase((last - first) * config.batch_size, start, end)


def add_network_flags(parser: argparse.ArgumentParser, batch: int) -> None:
  """The network and batch flags the train-step benchmarks share (the
  demo's network by default)."""
  parser.add_argument("--depth", type=int, default=26)
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=batch,
                      help="global batch over all local devices")
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_network_flags(parser, batch=64)
  parser.add_argument("--num_classes", type=int, default=0,
                      help="head size of a bare-step-only run (--loop_steps=0; "
                      "11166 = ML-Images); with the loop, the dataset's")
  parser.add_argument("--steps", type=int, default=20,
                      help="steps per bare-step measurement")
  parser.add_argument("--loop_steps", type=int, default=150,
                      help="steps of each full loop (0: bare step only)")
  parser.add_argument("--rounds", type=int, default=1,
                      help="full loops, each between two bare measurements")
  parser.add_argument("--log_every", type=int, default=50,
                      help="logging interval in steps")
  parser.add_argument("--checkpoint_every", type=int, default=100,
                      help="checkpoint interval in steps")
  parser.add_argument("--device_cores", type=int, default=-1,
                      help="CPU cores of the emulated device, the rest are "
                      "the host's (0: no split; default: 1 on a CPU-only "
                      "machine with >= 2 cores, else 0)")
  parser.add_argument("--data_dir", default="",
                      help="TFDS data dir for ml_images/synthetic")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak for MFU (default: from device kind)")
  args = parser.parse_args()

  if args.device_cores < 0:
    accelerator = any(importlib.util.find_spec(name)
                      for name in ACCELERATOR_PLUGINS)
    args.device_cores = int(not accelerator
                            and len(os.sched_getaffinity(0)) >= 2)
  split = split_cores(args.device_cores) if args.device_cores else None
  import jax  # pylint: disable=g-import-not-at-top
  # A persistent cache: every round's loop compiles the same programs.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  # pylint: disable=g-import-not-at-top
  from mlimages_jax.train import inputs as train_inputs
  from mlimages_jax.train import loop

  device = jax.local_devices()[0]
  print(f"devices: {jax.local_device_count()} x {device.device_kind}; "
        f"ResNet-{args.depth} width {args.width} at {args.image_size}px, "
        f"global batch {args.batch}, {args.dtype}")
  if split:
    print(f"emulated device: XLA on cores {sorted(split[0])}; host (input "
          f"pipeline, loop, checkpoints) on cores {sorted(split[1])}")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if not jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", str(tmp / "xla_cache"))
    config = _config(args)
    config.data_dir = args.data_dir or str(tmp / "tfds")
    if args.loop_steps:
      # A real training batch: the bare step runs the loop's very program.
      iterator = train_inputs.create_train_iterator(config)
      host_batch, num_classes = next(iterator), iterator.num_classes
    else:
      num_classes = args.num_classes or 45
      host_batch = _random_batch(config, num_classes, jax.local_device_count())
    bare = BareStep(config, host_batch, num_classes)
    clock = DeviceClock(split[0] if split else None)
    bares = [bare.measure(args.steps, clock)]
    print(f"bare compiled step: {bares[0].wall_rate:,.1f} img/s; model FLOPs "
          f"{bare.flops_per_image / 1e9:.3f} GFLOP/img (forward+backward)")
    peak = _peak_flops(device, args.peak_tflops)
    flops = bare.flops_per_image
    ceiling = peak * jax.local_device_count() / flops if peak else None
    if ceiling:
      print(f"MFU: {100 * bares[0].wall_rate / ceiling:.1f}% of "
            f"{peak / 1e12:.0f} TFLOP/s per device (100% would be "
            f"{ceiling:,.0f} img/s)")
    if not args.loop_steps:
      # Baseline: the rate at 100% model-FLOPs utilisation; ratio = MFU.
      rate = bares[0].wall_rate
      print(json.dumps({
          "benchmark": "train_step", "value": round(rate, 2),
          "unit": "images/s",
          "baseline": round(ceiling, 2) if ceiling else None,
          "ratio": round(rate / ceiling, 4) if ceiling else None,
          "target": 3000}))
      return
    # Wall-clock rates; on an emulated device also device-time rates.
    kinds = ["wall_rate"] + (["device_rate"] if clock.enabled else [])
    loops, brackets = {k: [] for k in kinds}, {k: [] for k in kinds}
    for i in range(args.rounds):
      loop = measure_loop(config, tmp / f"run{i}", clock)
      bares.append(bare.measure(args.steps, clock))
      for kind in kinds:
        loops[kind].append(getattr(loop, kind))
        brackets[kind].append((getattr(bares[-2], kind)
                               + getattr(bares[-1], kind)) / 2)
        print(f"round {i + 1} {kind.replace('_', ' ')}s: full loop "
              f"{loops[kind][-1]:,.1f} img/s, bare step "
              f"{getattr(bares[-2], kind):,.1f} / "
              f"{getattr(bares[-1], kind):,.1f} img/s before / after: loop "
              f"efficiency {loops[kind][-1] / brackets[kind][-1]:.3f}")
    for kind in kinds:
      loop, baseline = np.mean(loops[kind]), np.mean(brackets[kind])
      print(f"{kind.replace('_', ' ')}s: full training loop {loop:,.1f} "
            f"img/s; bare step {baseline:,.1f} img/s; loop efficiency "
            f"{loop / baseline:.3f} (target >= 0.95)")
    # The headline: device time where the device is emulated (other
    # processes on the shared cores cancel out), else wall clock.
    headline = kinds[-1]
    loop = float(np.mean(loops[headline]))
    baseline = float(np.mean(brackets[headline]))
    unit = "images/s of device time" if clock.enabled else "images/s"
    print(json.dumps({"benchmark": "train_loop_efficiency",
                      "value": round(loop, 2), "unit": unit,
                      "baseline": round(baseline, 2),
                      "ratio": round(loop / baseline, 4), "target": 0.95}))

if __name__ == "__main__":
  main()
