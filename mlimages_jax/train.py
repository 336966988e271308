"""Data-parallel pre-training of the ML-Images ResNet (``jax.pmap``, many hosts).

The spine of the project: `train_and_evaluate(config, workdir)` trains the
recipe of ML_IMAGES.md §7 on every device of every process, evaluates
validation mAP, writes logs and Orbax checkpoints, and resumes exactly from the
workdir. The structure follows flax ``examples/imagenet``: a replicated
`TrainState`, one pmapped `train_step` over the axis ``batch`` (gradients, BN
moving statistics and metrics averaged across all devices), host-side
logging every ``log_every_steps``.

The host runs ahead of the devices and waits for them only where it must:
a logging interval's metrics are fetched (and NaN checked) once the next
step is queued, a checkpoint is handed to Orbax after the next step is
queued (its copy is taken first: the step donates the state's memory), and
the learning rate is logged from the step's own metrics. The devices idle
only while a checkpoint's copy is taken, not while the host logs or Orbax
starts a save (measured by `benchmarks/train_step_bench.py`).

Everything a run needs is validated before the first compilation (config
fields and types, batch divisibility, dataset presence, checkpoint
compatibility), so mistakes cost seconds, not a compile.

Fine-tuning (ML_IMAGES.md §8) is the same loop with three options:
``init_checkpoint`` restores every variable but the head (``logits``) from a
pre-training run or a converted checkpoint; ``freeze_blocks=k`` keeps the stem
and the first k stages bit-identical (no gradient step, no weight decay, BN
moving statistics discarded: "FixBlock2" is k=2); ``progressive_resizing``
switches the training images to a larger size from a given step ("224 to 299"),
recreating the input iterator at the same data position.

Learning-rate scaling rule: the schedule in the config is written for
``schedule.reference_batch_size`` images per step. For another global batch
``B`` the learning rates are multiplied by ``B / reference`` (linear scaling,
Goyal et al. 2017) and every step count of the schedule (warm-up interval,
warm-up end, decay boundaries, ``num_train_steps``) by ``reference / B``, so the
run sees the same number of epochs with the same per-epoch LR profile.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from jax.experimental import multihost_utils

from mlimages_jax.checkpoints import store
from mlimages_jax import fileio
from mlimages_jax.inputs import pipeline
from mlimages_jax import losses
from mlimages_jax.evaluation import metrics as metrics_lib
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet

AXIS_NAME = "batch"
LOSSES = {"adaptive_sigmoid": "multi", "sigmoid": "multi", "softmax": "single"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"

# Every field a training config must have, with its type. Unknown or missing
# fields are errors: a typo must not silently train with a default.
CONFIG_SCHEMA: dict[str, Any] = {
    "dataset": str, "data_dir": str, "build_dataset_if_missing": bool,
    "train_split": str, "eval_split": str, "image_size": int,
    "label_mode": str, "transfer_dtype": str, "preprocess": dict,
    "model": {"depth": int, "width_multiplier": float,
              "bn_momentum": float, "sync_batch_norm": bool},
    "dtype": str,
    "loss": {"name": str, "pos_weight": float, "mask_thres": float,
             "neg_select": float},
    "optimizer": {"momentum": float, "weight_decay": float,
                  "weight_decay_bn": float},
    "schedule": {"reference_batch_size": int, "base_lr": float,
                 "warmup_factor": float, "warmup_interval": int,
                 "warmup_steps": int, "peak_lr": float,
                 "decay_boundaries": tuple, "decay_factor": float},
    "batch_size": int, "eval_batch_size": int, "num_train_steps": int,
    "log_every_steps": int, "eval_every_steps": int, "eval_at_start": bool,
    "num_eval_examples": int, "checkpoint_every_steps": int,
    "keep_checkpoints": int, "async_checkpoints": bool, "seed": int,
    "prefetch_to_device": int,
    "init_checkpoint": str, "freeze_blocks": int,
    "progressive_resizing": {"image_size": int, "from_step": int},
}
HEAD = "logits"  # The module that fine-tuning re-initialises.
STEM = "init_conv"


class ConfigError(ValueError):
  """The training config cannot run (raised before any compilation)."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; saved whole in checkpoints."""
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  loss_state: losses.LossState
  rng: jnp.ndarray


# ---------------------------------------------------------------------------
# Config validation.


def _check_fields(config: Mapping[str, Any], schema: Mapping[str, Any],
                  prefix: str, problems: list[str]):
  for key in config:
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      problems.append(f"unknown field {prefix}{key}{hint}")
  for key, kind in schema.items():
    if key not in config:
      problems.append(f"missing field {prefix}{key}")
      continue
    value = config[key]
    if isinstance(kind, dict):
      if not isinstance(value, Mapping):
        problems.append(f"{prefix}{key} must be a group of fields")
      else:
        _check_fields(value, kind, f"{prefix}{key}.", problems)
    elif kind is dict:
      if not isinstance(value, Mapping):
        problems.append(f"{prefix}{key} must be a mapping")
    elif kind is tuple:
      if not isinstance(value, (tuple, list)):
        problems.append(f"{prefix}{key} must be a tuple")
    elif kind is float:
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{prefix}{key} must be a number, got {value!r}")
    elif not isinstance(value, kind) or (kind is int and isinstance(value,
                                                                    bool)):
      problems.append(f"{prefix}{key} must be {kind.__name__}, got {value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every problem; runs before anything compiles."""
  problems: list[str] = []
  _check_fields(config.to_dict(), CONFIG_SCHEMA, "config.", problems)
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  if config.loss.name not in LOSSES:
    problems.append(f"config.loss.name {config.loss.name!r} is not one of "
                    f"{sorted(LOSSES)}")
  elif LOSSES[config.loss.name] != config.label_mode:
    problems.append(f"config.loss.name {config.loss.name!r} needs "
                    f"label_mode {LOSSES[config.loss.name]!r}, config has "
                    f"{config.label_mode!r}")
  if config.dtype not in DTYPES:
    problems.append(f"config.dtype {config.dtype!r} is not one of "
                    f"{sorted(DTYPES)}")
  if config.model.depth not in resnet.STAGE_SIZES:
    problems.append(f"config.model.depth {config.model.depth} is not one of "
                    f"{sorted(resnet.STAGE_SIZES)}")
  devices, local = jax.device_count(), jax.local_device_count()
  for name in ("batch_size", "eval_batch_size"):
    size = config[name]
    if size <= 0 or size % devices:
      problems.append(
          f"config.{name}={size} is not divisible by the {devices} devices "
          f"(the global batch is split evenly over all devices of all "
          f"{jax.process_count()} process(es), {local} per process)")
  for name in ("num_train_steps", "log_every_steps", "checkpoint_every_steps",
               "keep_checkpoints"):
    if config[name] <= 0:
      problems.append(f"config.{name} must be > 0, got {config[name]}")
  schedule = config.schedule
  if schedule.reference_batch_size <= 0 or schedule.warmup_interval <= 0:
    problems.append("config.schedule.reference_batch_size and "
                    "warmup_interval must be > 0")
  if list(schedule.decay_boundaries) != sorted(schedule.decay_boundaries) or (
      schedule.decay_boundaries
      and schedule.decay_boundaries[0] < schedule.warmup_steps):
    problems.append("config.schedule.decay_boundaries must be ascending and "
                    ">= warmup_steps")
  num_stages = len(resnet.STAGE_SIZES.get(config.model.depth, ()))
  if not 0 <= config.freeze_blocks <= num_stages:
    problems.append(f"config.freeze_blocks must be in 0..{num_stages} (the "
                    f"stem plus that many stages), got {config.freeze_blocks}")
  resize = config.progressive_resizing
  if resize.image_size < 0 or resize.from_step < 0:
    problems.append("config.progressive_resizing.image_size and from_step "
                    "must be >= 0")
  try:
    preprocessing.PreprocessConfig.for_mode(_train_mode(config),
                                            dict(config.preprocess))
  except ValueError as e:
    problems.append(f"config.preprocess: {e}")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _train_mode(config: ml_collections.ConfigDict) -> str:
  return "pretrain" if config.label_mode == "multi" else "finetune"


# ---------------------------------------------------------------------------
# Schedule, optimizer, model, state.


def schedule_scale(config: ml_collections.ConfigDict) -> float:
  """Global batch / reference batch: the LR factor (and inverse step factor)."""
  return config.batch_size / config.schedule.reference_batch_size


def scaled_steps(steps: int, config: ml_collections.ConfigDict) -> int:
  """A step count of the schedule, converted to this run's global batch."""
  return max(1, round(steps / schedule_scale(config))) if steps else 0


def num_train_steps(config: ml_collections.ConfigDict) -> int:
  return scaled_steps(config.num_train_steps, config)


def create_learning_rate_fn(config: ml_collections.ConfigDict
                            ) -> optax.Schedule:
  """§7: staircase exponential warm-up, then step decay (batch-scaled).

  At the reference batch: ``base_lr * warmup_factor ** (step // interval)``
  until ``warmup_steps``, then ``peak_lr * decay_factor ** k`` after the k-th
  decay boundary. (The original: 0.01 x1.297 every 4,400 steps to 35,200, then
  0.08, x0.1 at 110k/220k/330k/440k.)
  """
  s = config.schedule
  scale = schedule_scale(config)
  warmup_steps = scaled_steps(s.warmup_steps, config)
  after_warmup = optax.piecewise_constant_schedule(
      s.peak_lr * scale,
      {scaled_steps(b, config) - warmup_steps: s.decay_factor
       for b in s.decay_boundaries})
  if not warmup_steps:
    return after_warmup
  warmup = optax.exponential_decay(
      s.base_lr * scale, transition_steps=scaled_steps(s.warmup_interval, config),
      decay_rate=s.warmup_factor, staircase=True)
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def image_size_at(config: ml_collections.ConfigDict, step: int) -> int:
  """Training image size of step number `step` (1-based, batch-scaled).

  With ``progressive_resizing.image_size`` set, the steps after
  ``from_step`` (a schedule step count, scaled like the others) use it.
  """
  resize = config.progressive_resizing
  if resize.image_size and step > scaled_steps(resize.from_step, config):
    return resize.image_size
  return config.image_size


def is_frozen(path: tuple[str, ...], freeze_blocks: int) -> bool:
  """Whether a variable (by its path) is in the stem or a frozen stage."""
  if not freeze_blocks:
    return False
  top = path[0]
  return top == STEM or any(top.startswith(f"stages_{i}_")
                            for i in range(freeze_blocks))


def freeze_labels(params: Any, freeze_blocks: int) -> Any:
  """"frozen" / "trainable" for every parameter (optax.multi_transform)."""
  return flax.traverse_util.path_aware_map(
      lambda path, _: ("frozen" if is_frozen(path, freeze_blocks)
                       else "trainable"), params)


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule
                     ) -> optax.GradientTransformation:
  """SGD with (heavy-ball, TF MomentumOptimizer) momentum; L2 is in the loss.

  Frozen parameters get exactly zero updates (and no momentum state), so the
  L2 term in their gradient cannot move them either.
  """
  sgd = optax.sgd(learning_rate_fn, momentum=config.optimizer.momentum)
  if not config.freeze_blocks:
    return sgd
  return optax.multi_transform(
      {"trainable": sgd, "frozen": optax.set_to_zero()},
      functools.partial(freeze_labels, freeze_blocks=config.freeze_blocks))


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> resnet.ResNet:
  return resnet.create_model(
      config.model.depth, num_classes,
      width_multiplier=config.model.width_multiplier,
      dtype=DTYPES[config.dtype], bn_momentum=config.model.bn_momentum,
      bn_axis_name=AXIS_NAME if config.model.sync_batch_norm else None)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: resnet.ResNet, image_size: int,
                       tx: optax.GradientTransformation) -> TrainState:
  """A fresh, unreplicated train state (the same on every process for a seed)."""
  init_rng, state_rng = jax.random.split(rng)

  @jax.jit
  def init(rng):
    shape = (1, image_size, image_size, 3)
    # BN with an axis name needs the axis bound; init runs unmapped.
    init_model = model.clone(bn_axis_name=None)
    return init_model.init(rng, jnp.zeros(shape, jnp.float32), train=False)

  variables = init(init_rng)
  params, batch_stats = variables["params"], variables["batch_stats"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params),
      loss_state=losses.init_loss_state(model.num_classes), rng=state_rng)


def batch_norm_modules(batch_stats: Any) -> frozenset[tuple[str, ...]]:
  """Paths of the BN modules: exactly the modules that own batch statistics."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(batch_stats))
  return frozenset(path[:-1] for path in flat)


def weight_decay_penalty(params: Any, bn_modules: frozenset[tuple[str, ...]],
                         weight_decay: float,
                         weight_decay_bn: float = 0.0) -> jnp.ndarray:
  """``wd * sum(w**2) / 2`` over non-BN parameters (TF's ``tf.nn.l2_loss``).

  Added to the loss like the original (coupled L2, not decoupled decay), so it
  also passes through the momentum. BN scale/offset get ``weight_decay_bn``
  (0 in pre-training, 0.1 x 1e-4 in the original fine-tuning).
  """
  total = jnp.zeros((), jnp.float32)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for path, value in flat.items():
    coefficient = weight_decay_bn if path[:-1] in bn_modules else weight_decay
    if coefficient:
      total += coefficient * 0.5 * jnp.sum(jnp.square(value.astype(jnp.float32)))
  return total


# ---------------------------------------------------------------------------
# Steps.


def _images(batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
  """Model inputs in [-1, 1]; the colour distortion, if the batch asks, here.

  The input pipeline ships uint8 pixels plus per-example colour parameters
  and leaves the colour maths to the accelerator (host CPUs are the scarce
  resource); batches without a ``colour`` key are only normalised.
  """
  image = batch["image"]
  if "colour" in batch:
    return preprocessing.device_augment(image, batch["colour"])
  return preprocessing.normalize(image) if image.dtype == jnp.uint8 else image


def _data_loss(config: ml_collections.ConfigDict, logits: jnp.ndarray,
               labels: jnp.ndarray, loss_state: losses.LossState,
               rng: jax.Array) -> tuple[jnp.ndarray, losses.LossState]:
  name = config.loss.name
  if name == "adaptive_sigmoid":
    return losses.adaptive_sigmoid_loss(
        logits, labels, loss_state, rng, pos_weight=config.loss.pos_weight,
        mask_thres=config.loss.mask_thres, neg_select=config.loss.neg_select,
        axis_name=AXIS_NAME)
  if name == "sigmoid":
    return losses.sigmoid_cross_entropy(logits, labels), loss_state
  return (losses.softmax_cross_entropy(logits, labels, logits.shape[-1]),
          loss_state)


def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], *,
               model: resnet.ResNet, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict,
               bn_modules: frozenset[tuple[str, ...]],
               learning_rate_fn: optax.Schedule | None = None
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One SGD step on one device's shard; run under pmap(axis_name='batch').

  A non-finite loss or gradient leaves the state untouched (only `step`
  advances) and reports ``finite=0``; the host stops at its next check, so
  the last good state is what gets checkpointed. With `learning_rate_fn`
  (the optimizer's schedule) the metrics include the step's
  ``learning_rate``: computed here, the host never runs (and waits for)
  device ops of its own to log it.
  """
  # The same key on every device: the adaptive loss's negative-class sampling
  # must agree everywhere so that all devices keep identical counters.
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    (logits, _), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, _images(batch),
        train=True, mutable=["batch_stats"])
    data_loss, loss_state = _data_loss(config, logits, batch["labels"],
                                       state.loss_state, rng)
    decay = weight_decay_penalty(params, bn_modules,
                                 config.optimizer.weight_decay,
                                 config.optimizer.weight_decay_bn)
    return data_loss + decay, (data_loss, decay, loss_state,
                               updates["batch_stats"])

  grads, (data_loss, decay, loss_state, batch_stats) = jax.grad(
      loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS_NAME)
  batch_stats = jax.lax.pmean(batch_stats, AXIS_NAME)
  if config.freeze_blocks:
    # Frozen BN layers normalise with batch statistics like the rest but
    # keep their moving averages: the updates are discarded.
    batch_stats = flax.traverse_util.path_aware_map(
        lambda path, new: (_lookup(state.batch_stats, path)
                           if is_frozen(path, config.freeze_blocks) else new),
        batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = jax.lax.pmean(
      {"loss": data_loss, "weight_decay_loss": decay,
       "total_loss": data_loss + decay}, AXIS_NAME)
  metrics["grad_norm"] = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(
      metrics["grad_norm"])
  metrics["finite"] = finite.astype(jnp.float32)
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  updated = state.replace(params=params, batch_stats=batch_stats,
                          opt_state=opt_state, loss_state=loss_state)
  guarded = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                         updated, state)
  return guarded.replace(step=state.step + 1), metrics


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def eval_step(state: TrainState, batch: Mapping[str, jnp.ndarray], *,
              model: resnet.ResNet, config: ml_collections.ConfigDict
              ) -> jnp.ndarray:
  """Class scores for ranking: logits for the multi-label losses (a sigmoid
  would saturate confident scores into float32 ties that change the AP),
  softmax probabilities for single-label models."""
  logits, _ = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      _images(batch), train=False)
  if config.label_mode == "single":
    return jax.nn.softmax(logits)
  return logits


def pmap_train_step(model: resnet.ResNet, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    bn_modules: frozenset[tuple[str, ...]],
                    learning_rate_fn: optax.Schedule | None = None
                    ) -> Callable:
  return jax.pmap(
      functools.partial(train_step, model=model, tx=tx, config=config,
                        bn_modules=bn_modules,
                        learning_rate_fn=learning_rate_fn),
      axis_name=AXIS_NAME, donate_argnums=(0,))


def pmap_eval_step(model: resnet.ResNet,
                   config: ml_collections.ConfigDict) -> Callable:
  return jax.pmap(functools.partial(eval_step, model=model, config=config),
                  axis_name=AXIS_NAME)


# ---------------------------------------------------------------------------
# Host-side helpers.


def replicate(tree: Any) -> Any:
  """Host copies on every local device, sharded exactly like pmap's outputs.

  Matching the output sharding (a mesh axis named like the pmap axis) keeps
  the train step from compiling twice; stacking NumPy copies avoids one tiny
  compilation per parameter shape.
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS_NAME,))
  sharding = jax.NamedSharding(mesh, jax.P(AXIS_NAME))
  count = jax.local_device_count()
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * count), sharding),
      jax.device_get(tree))


def unreplicate(tree: Any) -> Any:
  """The first local device's copy, as NumPy (no per-shape compilation).

  All leaves are fetched in one `jax.device_get` (transfers started together,
  then awaited), not one blocking round trip per leaf.
  """
  first = jax.tree.map(lambda x: x.addressable_shards[0].data, tree)
  return jax.tree.map(lambda x: x[0], jax.device_get(first))


class MetricsLog:
  """``W/metrics.jsonl``: one JSON object per line, appended and flushed."""

  def __init__(self, path: str | os.PathLike, enabled: bool):
    self.path = pathlib.Path(path)
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """On resume, drop lines past the restored step (they will be redone)."""
    if not self.enabled or not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    with fileio.atomic_writer(self.path) as f:
      f.write("".join(f"{line}\n" for line in kept))

  def write(self, record: Mapping[str, Any]) -> None:
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run: explicit flags, a detected cluster, or none.

  With no flags, `jax.distributed.initialize()` auto-detects SLURM, Open MPI,
  Kubernetes and Cloud TPU environments; outside those it reports no
  coordinator and we run as a single process. CPU collectives use gloo (the
  setting only affects the CPU backend).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address or num_processes or process_id is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if "coordinator_address" not in str(e):
      raise
    logging.info("No cluster environment detected: single process.")


# ---------------------------------------------------------------------------
# Evaluation.


def _iterator(config: ml_collections.ConfigDict, *, split: str, mode: str,
              global_batch_size: int, seed: int, image_size: int) -> Any:
  return pipeline.create_input_iterator(
      dataset=config.dataset, data_dir=config.data_dir or None, split=split,
      global_batch_size=global_batch_size, image_size=image_size,
      mode=mode, label_mode=config.label_mode, seed=seed,
      preprocess=dict(config.preprocess) or None,
      process_index=jax.process_index(), process_count=jax.process_count(),
      local_device_count=jax.local_device_count(),
      transfer_dtype=config.transfer_dtype,
      build_if_missing=config.build_dataset_if_missing)


def create_train_iterator(config: ml_collections.ConfigDict,
                          step: int = 1) -> Any:
  """This process's training stream from step number `step` on, at that
  step's image size (position 0: `set_state` moves it)."""
  return _iterator(config, split=config.train_split, mode=_train_mode(config),
                   global_batch_size=config.batch_size, seed=config.seed,
                   image_size=image_size_at(config, step))


def evaluate(p_eval_step: Callable, state: TrainState,
             config: ml_collections.ConfigDict,
             image_size: int | None = None) -> dict[str, float]:
  """Validation metrics over the eval split (or its first `num_eval_examples`).

  Multi-label: ``{"mAP"}``; single-label: ``{"top1", "top5"}`` (top-k
  accuracy, ties resolved in the model's favour as in `metrics.top_k_correct`).
  The eval iterator yields the same number of (padded, masked) batches on
  every process, which keeps the SPMD program in lockstep; the scores of all
  processes are then gathered and ranked on the host.
  """
  iterator = _iterator(config, split=config.eval_split, mode="eval",
                       global_batch_size=config.eval_batch_size,
                       seed=config.seed,
                       image_size=image_size or config.image_size)
  num_batches = iterator.num_batches
  if config.num_eval_examples > 0:
    num_batches = min(num_batches, math.ceil(config.num_eval_examples
                                             / config.eval_batch_size))
  batches = pipeline.prefetch_to_device(iterator, 2)
  scores, labels, masks = [], [], []
  for batch in itertools.islice(batches, num_batches):
    scores.append(p_eval_step(state, batch))
    labels.append(batch["labels"])
    masks.append(batch["mask"])
  scores, labels, masks = (
      np.concatenate([np.asarray(x).reshape(-1, *x.shape[2:]) for x in xs])
      for xs in (scores, labels, masks))
  if jax.process_count() > 1:
    scores, labels, masks = multihost_utils.process_allgather(
        (scores, labels, masks), tiled=True)
  if config.label_mode == "single":
    accumulator = metrics_lib.SingleLabelAccumulator(top_k=(1, 5))
    accumulator.update(scores, labels, masks)
    result = accumulator.result()
    return {"top1": result["top1"], "top5": result["top5"]}
  keep = masks > 0
  return {"mAP": metrics_lib.mean_average_precision(scores[keep],
                                                    labels[keep])}


# ---------------------------------------------------------------------------
# Fine-tuning initialisation.


def load_backbone(path: str, config: ml_collections.ConfigDict,
                  abstract_variables: Mapping[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Pre-trained ``(params, batch_stats)`` for everything but the head.

  `path` is anything `store.load_for_inference` reads (a pre-training
  workdir, a step directory, a converted inference checkpoint). The backbone
  must match the config's exactly (the checkpoint metadata is checked first,
  then every variable's shape, against `abstract_variables` from
  ``jax.eval_shape``), so a wrong checkpoint fails before any compilation;
  the class count may differ since the head is re-initialised.
  """
  try:
    variables, metadata = store.load_for_inference(path)
  except store.CheckpointError as e:
    raise store.CheckpointError(
        f"config.init_checkpoint: {e}. Give a pre-training workdir or a "
        f"converted checkpoint; e.g. make the demo's with: python main.py "
        f"--config=configs/pretrain.py:demo --workdir={path}") from e
  problems = [
      f"model.{key}: checkpoint {metadata['model'][key]}, config "
      f"{config.model[key]}" for key in ("depth", "width_multiplier")
      if metadata["model"][key] != config.model[key]]
  if not problems:
    for collection in ("params", "batch_stats"):
      want = flax.traverse_util.flatten_dict(abstract_variables[collection])
      got = flax.traverse_util.flatten_dict(variables[collection])
      for key in sorted(set(want) | set(got)):
        if key[0] == HEAD:
          continue
        if key not in got or key not in want:
          where = "checkpoint" if key not in got else "model"
          problems.append(f"{collection}/{'/'.join(key)} missing in the "
                          f"{where}")
        elif got[key].shape != want[key].shape:
          problems.append(f"{collection}/{'/'.join(key)}: checkpoint "
                          f"{got[key].shape}, model {want[key].shape}")
  if problems:
    raise store.CheckpointError(
        f"{path}: the backbone does not match the config: "
        + "; ".join(problems[:10])
        + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
  return ({k: v for k, v in variables["params"].items() if k != HEAD},
          {k: v for k, v in variables["batch_stats"].items() if k != HEAD})


def with_backbone(state: TrainState, params: Mapping[str, Any],
                  batch_stats: Mapping[str, Any]) -> TrainState:
  """`state` with every module but the head replaced (head kept as init)."""
  return state.replace(
      params={k: params.get(k, v) for k, v in state.params.items()},
      batch_stats={k: batch_stats.get(k, v)
                   for k, v in state.batch_stats.items()})


# ---------------------------------------------------------------------------
# The loop.


def check_finite(history: list[tuple[int, dict[str, np.ndarray]]],
                  last_checkpoint: int | None) -> None:
  for step, values in history:
    if not values["finite"]:
      raise FloatingPointError(
          f"Training stopped: the loss or the gradients became NaN/Inf at "
          f"step {step} (loss={float(values['loss'])}, "
          f"grad_norm={float(values['grad_norm'])}). That update was not "
          f"applied; the last checkpoint is step {last_checkpoint}. Lower "
          f"the learning rate (config.schedule) or check the input data.")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> TrainState:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Returns the final, unreplicated train state.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  is_chief = jax.process_index() == 0
  if is_chief:
    workdir.mkdir(parents=True, exist_ok=True)
  total_steps = num_train_steps(config)
  save_every = config.checkpoint_every_steps

  # Input first: a missing dataset fails here, in seconds.
  train_iter = create_train_iterator(config)
  info = pipeline.dataset_info(config.dataset, config.data_dir or None,
                                    label_mode=config.label_mode)
  num_classes = info.num_classes
  metadata = store.make_metadata(
      depth=config.model.depth, num_classes=num_classes,
      width_multiplier=config.model.width_multiplier,
      image_size=image_size_at(config, total_steps),
      label_mode=config.label_mode, class_ids=info.class_ids,
      class_names=info.class_names)

  checkpointer = store.TrainCheckpointer(
      workdir, keep=config.keep_checkpoints,
      async_save=config.async_checkpoints)
  start_step = checkpointer.latest_step() or 0
  if image_size_at(config, start_step + 1) != image_size_at(config, 1):
    train_iter = create_train_iterator(config, start_step + 1)  # Resized.
  if start_step:
    store.check_compatible(
        checkpointer.metadata(start_step), metadata,
        f"{checkpointer.directory / str(start_step)}")

  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=not is_chief, asynchronous=True)
  metrics_log = MetricsLog(workdir / METRICS_FILE, enabled=is_chief)
  if is_chief:
    with fileio.atomic_writer(workdir / CONFIG_FILE) as f:
      f.write(config.to_json_best_effort(indent=2))
    writer.write_hparams(_flatten(config.to_dict()))
  if schedule_scale(config) != 1:
    logging.info("Global batch %d vs reference %d: learning rates x%.4g, "
                 "schedule steps x%.4g -> %d steps.", config.batch_size,
                 config.schedule.reference_batch_size, schedule_scale(config),
                 1 / schedule_scale(config), total_steps)

  model = create_model(config, num_classes)
  backbone = None
  if config.init_checkpoint and not start_step:
    shape = (1, config.image_size, config.image_size, 3)
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros(shape), train=False))
    backbone = load_backbone(config.init_checkpoint, config, abstract)
  learning_rate_fn = create_learning_rate_fn(config)
  tx = create_optimizer(config, learning_rate_fn)
  state = create_train_state(jax.random.PRNGKey(config.seed), config, model,
                             config.image_size, tx)
  if backbone is not None:
    state = with_backbone(state, *backbone)
    logging.info("Initialised all but the %r head from %s.", HEAD,
                 config.init_checkpoint)
  if start_step:
    state, position = checkpointer.restore(start_step, state)
    if position is not None:
      train_iter.set_state(position)
    logging.info("Resumed from step %d of %d.", start_step, total_steps)
    metrics_log.truncate_after(start_step)
  bn_modules = batch_norm_modules(state.batch_stats)
  state = replicate(state)
  p_train_step = pmap_train_step(model, tx, config, bn_modules,
                                 learning_rate_fn)
  p_eval_step = pmap_eval_step(model, config)

  def run_eval(step: int) -> None:
    t0 = time.perf_counter()
    image_size = image_size_at(config, max(step, 1))
    results = evaluate(p_eval_step, state, config, image_size)
    logging.info("step %d: %s at %d px: %s (%.1f s)", step, config.eval_split,
                 image_size,
                 "  ".join(f"{k} {v:.4f}" for k, v in results.items()),
                 time.perf_counter() - t0)
    writer.write_scalars(step, {f"{config.eval_split}_{k}": v
                                for k, v in results.items()})
    metrics_log.write({"step": step, "split": config.eval_split,
                       "image_size": image_size, **results})

  last_checkpoint = start_step or None
  # (step, time) of the last point where the host waited for the devices.
  synced = (start_step, time.perf_counter())

  def flush(records: list[tuple[int, dict[str, jax.Array]]]) -> None:
    """Checks NaN and logs `records`, the metrics since the last flush.

    Waits for the last step of `records`; the training rate is measured
    between two such waits (the first interval includes compilation).
    """
    nonlocal synced
    host = list(zip([s for s, _ in records],
                    unreplicate([m for _, m in records])))
    check_finite(host, last_checkpoint)
    step, now = records[-1][0], time.perf_counter()
    images_per_sec = ((step - synced[0]) * config.batch_size
                      / max(now - synced[1], 1e-9))
    synced = (step, now)
    summary = {k: float(np.mean([m[k] for _, m in host]))
               for k in ("loss", "weight_decay_loss", "total_loss",
                         "grad_norm")}
    summary["learning_rate"] = float(host[-1][1]["learning_rate"])
    # Images that failed to decode were skipped by the pipeline; a multi-day
    # run reports them instead of crashing (summed over all processes).
    failures = np.asarray(batches.decode_failures, np.int64)
    if jax.process_count() > 1:
      failures = multihost_utils.process_allgather(failures)
    summary["decode_failures"] = int(np.sum(failures))
    writer.write_scalars(step, dict(summary, images_per_sec=images_per_sec))
    metrics_log.write({"step": step, "loss": summary["loss"],
                       "learning_rate": summary["learning_rate"],
                       "images_per_sec": images_per_sec,
                       "decode_failures": summary["decode_failures"]})
    remaining = (total_steps - step) * config.batch_size / images_per_sec
    logging.info("step %d/%d  loss %.4f  lr %.4g  %.1f img/s  eta %s", step,
                 total_steps, summary["loss"], summary["learning_rate"],
                 images_per_sec, _duration(remaining))

  log_every, eval_every = config.log_every_steps, config.eval_every_steps
  try:
    if config.eval_at_start and start_step == 0:
      run_eval(0)
      synced = (start_step, time.perf_counter())
    batches = pipeline.prefetch_to_device(train_iter,
                                                config.prefetch_to_device)
    image_size = image_size_at(config, start_step + 1)
    history: list[tuple[int, dict[str, jax.Array]]] = []
    # A logging interval's metrics are fetched, and a checkpoint handed to
    # Orbax, only once the next step has been dispatched: the devices never
    # idle while the host logs or starts a save.
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    to_save = None
    for step in range(start_step + 1, total_steps + 1):
      if image_size_at(config, step) != image_size:
        # Progressive resizing: the same data position at the new size.
        image_size = image_size_at(config, step)
        position = batches.get_state()
        train_iter = create_train_iterator(config, step)
        train_iter.set_state(position)
        batches = pipeline.prefetch_to_device(
            train_iter, config.prefetch_to_device)
        logging.info("step %d: training images now %d px.", step, image_size)
      state, step_metrics = p_train_step(state, next(batches))
      history.append((step, step_metrics))
      if pending:
        flush(pending)
        pending = []
      if to_save:
        checkpointer.save(*to_save)
        last_checkpoint, to_save = to_save[0], None
      is_save = step % save_every == 0 or step == total_steps
      is_eval = eval_every > 0 and step % eval_every == 0
      if is_save or is_eval:
        # Both wait for this step anyway (its state), so log it now; a NaN
        # stops the run before its state is saved or evaluated.
        flush(history)
        history = []
      elif step % log_every == 0:
        pending, history = history, []
      if is_save:
        # Copied now: the next step reuses (donates) the state's memory.
        to_save = (step, unreplicate(state), metadata, batches.get_state())
      if is_eval and step != total_steps:
        run_eval(step)
        synced = (step, time.perf_counter())  # Train rate excludes eval.
    if to_save:
      checkpointer.save(*to_save)
    if total_steps > start_step:
      run_eval(total_steps)
  finally:
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.flush()
  return unreplicate(state)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = (value if isinstance(value, (int, float, str,
                                                            bool))
                                else str(value))
  return flat


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
