r"""Compile ahead for a TPU topology, on any CPU machine (no TPU needed).

libtpu compiles for a TPU slice it is only told about
(`jax.experimental.topologies`), so a run's train step and evaluation step
can be compiled, measured and checked for fit before any TPU is paid for
(as MaxText's train_compile does)::

  python -m mlimages_jax.train.compile_ahead --config=configs/pretrain.py \
      --topology=v5e:2x2 --num_classes=11166 [--config.batch_size=...]

Per chip it reports the HBM the compiled programs need (XLA's memory
analysis: arguments, outputs, temporaries) against the chip's capacity, the
largest per-chip batch that fits, FLOPs and HBM bytes per image (XLA's cost
analysis) and a roofline bound on images/s per chip. Compiling the full
ResNet-101 step takes minutes on 2 cores, so the batch search compiles as
little as it can: two batches for a linear memory model (the config's batch
per chip and half of it; halving first while the config's does not fit),
one compile of its prediction to check it (stepping down if it does not
fit, never up to a batch known not to fit).

XLA's own time estimate (``optimal_seconds``) is printed only when it is
positive. libtpu's cost analysis gives a plausible time for small programs
(the smoke step: within 15% of the roofline bound) but a negative one for
the full ResNet-101 step, and for the smoke step at tens of thousands of
images: a marker that its model gave up, not a time, so a missing estimate
is reported as such and the roofline bound is the figure to plan with.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mlimages_jax.inference import predict
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet
from mlimages_jax.train import optimizer
from mlimages_jax.train import schedule
from mlimages_jax.train import state as state_lib
from mlimages_jax.train import steps

# Several processes may compile at once (a test run beside a long compile):
# libtpu's one-process lockfile guards real chips, which compiling never uses.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip from its vendor datasheet (cloud.google.com/tpu/docs)."""
  name: str
  hbm_bytes: int
  peak_flops: float  # Dense bf16 FLOP/s.
  hbm_bandwidth: float  # Bytes/s.


# Keyed by the device_kind libtpu reports.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1.2e12),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2.765e12),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1.64e12),
}
# Generations whose two TensorCores JAX drives as one device (megacore).
_MEGACORE = ("v4", "v5p")


class DoesNotFitError(ValueError):
  """A program needs more HBM than the chip has (XLA refused to compile)."""


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program's figures, per chip, at `batch` images per chip."""
  name: str
  batch: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # Outputs written over donated arguments.
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  optimal_seconds: float | None  # XLA's estimate; None where invalid.

  @property
  def hbm_bytes(self) -> int:
    """Peak HBM: live arguments, outputs (less donated), temporaries."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes
            + self.temp_bytes + self.code_bytes)

  @property
  def flops_per_image(self) -> float:
    return self.flops / self.batch

  @property
  def bytes_per_image(self) -> float:
    return self.bytes_accessed / self.batch

  def roofline(self, chip: Chip) -> float:
    """Upper bound on images/s per chip: compute- or bandwidth-bound."""
    return min(chip.peak_flops / self.flops_per_image,
               chip.hbm_bandwidth / self.bytes_per_image)


@dataclasses.dataclass(frozen=True)
class Report:
  """What `compile_for_topology` found for one config on one topology."""
  topology: str
  chips: int
  chip: Chip
  requested_batch: int  # Per chip: the config's, or --per_chip_batch.
  train: Program | None  # At `requested_batch`; None where XLA refused it.
  eval: Program
  largest_batch: int  # Per chip, train step.
  largest: Program  # The train step compiled at `largest_batch`.
  compiles: tuple[tuple[int, int | None], ...]  # (batch, HBM or None: OOM).

  def format(self) -> str:
    """The human-readable table the command prints."""
    c = self.chip
    lines = [f"{self.topology}: {self.chips} x {c.name} chips, per chip "
             f"{c.hbm_bytes / GiB:.0f} GiB HBM, {c.peak_flops / 1e12:.0f} "
             f"TFLOP/s bf16, {c.hbm_bandwidth / 1e9:.0f} GB/s"]
    if self.train is None:
      lines.append(f"train step, {self.requested_batch} images per chip: "
                   "does not fit (XLA refused it: out of HBM)")
    for p in (self.train, self.eval, self.largest):
      if p is None:
        continue
      fits = "" if p.hbm_bytes <= c.hbm_bytes else ": does not fit"
      estimate = ("n/a (XLA gives no valid estimate)"
                  if p.optimal_seconds is None else
                  f"{p.batch / p.optimal_seconds:,.0f} img/s")
      lines += [
          f"{p.name} step, {p.batch} images per chip{fits}:",
          f"  HBM {p.hbm_bytes / GiB:.2f} of {c.hbm_bytes / GiB:.0f} GiB "
          f"(arguments {p.argument_bytes / GiB:.2f}, outputs "
          f"{p.output_bytes / GiB:.2f} of which donated "
          f"{p.alias_bytes / GiB:.2f}, temporaries {p.temp_bytes / GiB:.2f}"
          f", code {p.code_bytes / GiB:.3f})",
          f"  {p.flops_per_image / 1e9:.2f} GFLOP and "
          f"{p.bytes_per_image / 1e6:.1f} MB of HBM traffic per image",
          f"  roofline {p.roofline(c):,.0f} img/s per chip; XLA's estimate "
          f"{estimate}"]
    tried = ", ".join(f"{b}: " + ("does not fit" if m is None else
                                  f"{m / GiB:.2f} GiB")
                      for b, m in self.compiles)
    lines.append(f"largest train batch per chip that fits: "
                 f"{self.largest_batch} (compiled {tried})")
    return "\n".join(lines)


def topology_devices(topology: str, num_slices: int = 1
                     ) -> list[jax.Device]:
  """The compile-only devices of a topology such as ``v5e:2x2``.

  v4 and v5p are described as on real slices, one device per chip
  (megacore).
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs: dict[str, Any] = {}
  if topology.split(":")[0] in _MEGACORE:
    kwargs["chip_config_name"] = "megacore"
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    desc = topologies.get_topology_desc(topology, "tpu", **kwargs)
  except Exception as e:  # libtpu says what it accepts.
    raise ValueError(f"topology {topology!r} (slices: {num_slices}): "
                     f"{e}") from None
  return list(desc.devices)


def chip_of(devices: Sequence[jax.Device]) -> Chip:
  """The datasheet figures of the devices' chip."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise ValueError(f"no datasheet figures for {kind!r}; known: "
                     f"{sorted(CHIPS)}")
  return CHIPS[kind]


def _per_device(shape_dtype: Any, count: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((count, *shape_dtype.shape), shape_dtype.dtype)


def _train_image_size(config: ml_collections.ConfigDict) -> int:
  """The largest training image size of the schedule (progressive resizing)."""
  return max(schedule.image_size_at(config, 1), schedule.image_size_at(
      config, schedule.num_train_steps(config)))


def _compile(fn: Callable, args: Sequence[Any], name: str,
             batch: int) -> Program:
  """Compiles `fn` for `args`; DoesNotFitError when HBM is too small."""
  try:
    compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      raise DoesNotFitError(f"{name} step at {batch} per chip: "
                            f"{str(e).splitlines()[0]}") from None
    raise
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  seconds = cost.get("optimal_seconds", -1.0)
  return Program(
      name=name, batch=batch,
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes,
      flops=cost.get("flops", 0.0), bytes_accessed=cost["bytes accessed"],
      optimal_seconds=seconds if seconds > 0 else None)


class StepCompiler:
  """Compiles the config's train and evaluation steps for some devices."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               devices: Sequence[jax.Device]):
    self.config = config
    self.num_classes = num_classes
    self.devices = list(devices)
    self.image_size = _train_image_size(config)
    model = state_lib.create_model(config, num_classes)
    learning_rate_fn = schedule.create_learning_rate_fn(config)
    tx = optimizer.create_optimizer(config, learning_rate_fn)
    state = jax.eval_shape(lambda: state_lib.create_train_state(
        jax.random.PRNGKey(0), model, self.image_size, tx))
    n = len(self.devices)
    self.state = jax.tree.map(lambda x: _per_device(x, n), state)
    self.variables = {"params": self.state.params,
                      "batch_stats": self.state.batch_stats}
    self.train_step = steps.pmap_train_step(
        model, tx, config, optimizer.batch_norm_modules(state.batch_stats),
        learning_rate_fn, devices=self.devices)
    # Evaluation runs the float32 network of `mlimages evaluate`.
    self.eval_step = predict.pmapped_forward(
        resnet.create_model(config.model.depth, num_classes,
                            width_multiplier=config.model.width_multiplier),
        tuple(self.devices))

  def _images(self, batch: int, dtype: Any = jnp.uint8
              ) -> jax.ShapeDtypeStruct:
    size = self.image_size
    return jax.ShapeDtypeStruct((len(self.devices), batch, size, size, 3),
                                dtype)

  def train(self, batch: int) -> Program:
    """The train step at `batch` images per device, as the loop feeds it."""
    config, n = self.config, len(self.devices)
    image_dtype = (jnp.uint8 if config.transfer_dtype == "uint8"
                   else jnp.float32)
    if config.label_mode == "single":
      labels = jax.ShapeDtypeStruct((n, batch), jnp.int32)
    else:
      labels = jax.ShapeDtypeStruct((n, batch, self.num_classes),
                                    jnp.float32)
    inputs = {"image": self._images(batch, image_dtype), "labels": labels,
              "mask": jax.ShapeDtypeStruct((n, batch), jnp.float32)}
    pre = config.preprocess
    if pre.colour_on_device and pre.colour_fraction > 0:
      inputs["colour"] = jax.ShapeDtypeStruct(
          (n, batch, preprocessing.COLOUR_PARAMS), jnp.float32)
    return _compile(self.train_step, (self.state, inputs), "train", batch)

  def eval(self, batch: int) -> Program:
    return _compile(self.eval_step, (self.variables, self._images(batch)),
                    "eval", batch)


def _compile_or_none(compile_at: Callable[[int], Program], batch: int
                     ) -> Program | None:
  """`compile_at(batch)`, or None where XLA refused (out of HBM)."""
  try:
    return compile_at(batch)
  except DoesNotFitError:
    return None


def starting_points(compile_at: Callable[[int], Program], capacity: int,
                    batch: int
                    ) -> tuple[Program | None, list[Program],
                               list[tuple[int, int | None]]]:
  """The programs the batch search starts from: `batch` and half of it
  (double when it is 1) where `batch` fits; where it does not (the recipe's
  512 per chip on a 16 GiB chip), halving until two batches fit, so the
  config's own batch never stops the search.

  Returns the program at `batch` (None where XLA refused it), the fitting
  ones and every compile made ((batch, HBM or None where refused)).
  """
  requested = _compile_or_none(compile_at, batch)
  compiles = [(batch, requested and requested.hbm_bytes)]
  fitting = []
  if requested is not None and requested.hbm_bytes <= capacity:
    fitting.append(requested)
  b = batch
  while len(fitting) < 2:
    b = b // 2 if b > 1 else 2
    if any(tried == b for tried, _ in compiles):
      break  # 1 fits, 2 does not.
    program = _compile_or_none(compile_at, b)
    compiles.append((b, program and program.hbm_bytes))
    if program is not None and program.hbm_bytes <= capacity:
      fitting.append(program)
    elif b == 1:
      raise DoesNotFitError(f"not even one image per chip fits in "
                            f"{capacity / GiB:.0f} GiB")
  return requested, fitting, compiles


def largest_batch(compile_at: Callable[[int], Program], capacity: int,
                  fitting: Sequence[Program], multiple: int = 8,
                  tries: int = 3, too_big: tuple[int, int | None] | None = None
                  ) -> tuple[Program, list[tuple[int, int | None]]]:
  """The largest batch whose program fits `capacity`, from few compiles.

  Memory is linear in the batch (activations): the line through the two
  largest fitting programs predicts the largest batch (rounded down to a
  `multiple`), one compile checks it. Once a batch is known not to fit, the
  next try lies between it and the largest that fits: on the line through
  both where XLA gave its memory, halfway where it refused to compile
  (`too_big`: such a batch known beforehand). With one fitting program
  (only 1 image per chip fits) that one is the answer.
  Returns the largest fitting program and the compiles made here
  ((batch, HBM or None where XLA refused)).
  """
  fitting = sorted((p for p in fitting if p.hbm_bytes <= capacity),
                   key=lambda p: p.batch)
  if not fitting:
    raise DoesNotFitError("no starting batch fits")
  compiles: list[tuple[int, int | None]] = []
  over = too_big  # Smallest batch known not to fit.
  for _ in range(tries if len(fitting) > 1 else 0):
    a, b = fitting[-2:]
    if over is not None and over[1] is None:
      batch = (b.batch + over[0]) // 2
    else:
      if over is not None:
        a = _program_like(b, *over)
      slope = (b.hbm_bytes - a.hbm_bytes) / (b.batch - a.batch)
      batch = (b.batch + int((capacity - b.hbm_bytes) / slope)
               if slope > 0 else 2 * b.batch)
    if over is not None:
      batch = min(batch, over[0] - 1)
    if batch >= multiple:
      batch -= batch % multiple
    if batch <= b.batch:
      break
    try:
      program = compile_at(batch)
    except DoesNotFitError:
      program = None
    compiles.append((batch, program and program.hbm_bytes))
    if program is None or program.hbm_bytes > capacity:
      over = compiles[-1]
      continue
    fitting.append(program)
    if program.hbm_bytes >= 0.9 * capacity:
      break
  return fitting[-1], compiles


def _program_like(program: Program, batch: int, hbm: int) -> Program:
  """A stand-in of `program` at `batch` needing `hbm` (for the line)."""
  return dataclasses.replace(program, batch=batch, argument_bytes=hbm,
                             output_bytes=0, alias_bytes=0, temp_bytes=0,
                             code_bytes=0)


def compile_for_topology(config: ml_collections.ConfigDict, topology: str,
                         num_classes: int, per_chip_batch: int | None = None,
                         num_slices: int = 1) -> Report:
  """Compiles the config's train and evaluation steps for `topology`.

  `per_chip_batch` defaults to the config's global batch over the chips;
  the memory model starts from it (`starting_points`). The evaluation step
  is compiled at the config's evaluation batch over the chips.
  """
  devices = topology_devices(topology, num_slices)
  chip = chip_of(devices)
  n = len(devices)
  compiler = StepCompiler(config, num_classes, devices)
  batch = per_chip_batch or max(config.batch_size // n, 1)
  train, fitting, start = starting_points(compiler.train, chip.hbm_bytes,
                                          batch)
  too_big = [(b, m) for b, m in start if m is None or m > chip.hbm_bytes]
  largest, compiles = largest_batch(
      compiler.train, chip.hbm_bytes, fitting,
      too_big=min(too_big) if too_big else None)
  return Report(
      topology=topology if num_slices == 1 else f"{topology} x{num_slices}",
      chips=n, chip=chip, requested_batch=batch, train=train,
      eval=compiler.eval(max(config.eval_batch_size // n, 1)),
      largest_batch=largest.batch, largest=largest,
      compiles=(*start, *compiles))


def main(argv: Sequence[str]) -> int:
  """The command: flags in, the report printed (see the module docstring);
  a bad topology, a missing dataset or no batch that fits: one line, 1."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mlimages_jax.inputs import pipeline
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  config, num_classes = values.config, values.num_classes
  try:
    if not num_classes:
      num_classes = pipeline.dataset_info(
          config.dataset, config.data_dir or None,
          label_mode=config.label_mode).num_classes
    report = compile_for_topology(config, values.topology, num_classes,
                                  values.per_chip_batch, values.num_slices)
  except (ValueError, pipeline.DatasetNotBuiltError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(report.format())
  return 0


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Training config, e.g. configs/pretrain.py.",
      lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x2, v4:2x2x1, "
                      "v5p:2x2x1, v6e:4x4.")
  flags.DEFINE_integer("num_slices", 1, "Slices (multislice, over DCN).")
  flags.DEFINE_integer("num_classes", 0, "Classes of the model; 0: read "
                       "from the config's built dataset.")
  flags.DEFINE_integer("per_chip_batch", None, "Train batch per chip to "
                       "start the search from (default: the config's).")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
