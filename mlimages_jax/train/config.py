"""The training config: every field declared once, and its validation.

`base_config()` is the one place a field exists, with its type (from its
default) and what it means. The recipes in ``configs/`` start from it and
override values; `validate_config` derives its schema from it, so a field
added here is known everywhere and a typo on the command line or in a recipe
is an error before anything compiles, never a silent default.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet

# Loss name -> the label mode it trains on.
LOSSES = {"adaptive_sigmoid": "multi", "sigmoid": "multi", "softmax": "single"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """The training config cannot run (raised before any compilation)."""


def base_config() -> ml_collections.ConfigDict:
  """Every field a training run reads, with the value both recipes share.

  Fields a recipe must choose (dataset, loss, schedule, batch, steps) have
  placeholders of the right type here; ``configs/pretrain.py`` (§7) and
  ``configs/finetune_imagenet.py`` (§8) set them.
  """
  c = ml_collections.ConfigDict()

  # Data.
  c.dataset = ""  # TFDS name, e.g. ml_images/full or imagenet2012.
  c.data_dir = ""  # "" = TFDS default (~/tensorflow_datasets, $TFDS_DATA_DIR).
  c.build_dataset_if_missing = False  # Only ever builds ml_images/synthetic.
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.label_mode = "multi"  # "multi" (sigmoid losses) or "single" (softmax).
  c.transfer_dtype = "uint8"  # Normalised on the device: 1/4 of the bytes.
  c.preprocess = ml_collections.ConfigDict()  # PreprocessConfig overrides.

  # Model and loss.
  c.model = ml_collections.ConfigDict(dict(
      depth=101, width_multiplier=1.0, bn_momentum=0.997,
      sync_batch_norm=False))
  c.dtype = "bfloat16"  # Compute dtype; parameters stay float32.
  c.loss = ml_collections.ConfigDict(dict(
      name="adaptive_sigmoid", pos_weight=12.0, mask_thres=0.7,
      neg_select=0.1))  # The §7 values; only adaptive_sigmoid reads them.

  # Optimisation: SGD with momentum, L2 added to the loss.
  c.optimizer = ml_collections.ConfigDict(dict(
      momentum=0.9, weight_decay=1e-4, weight_decay_bn=0.0))
  # Written for `reference_batch_size` images per step; see schedule.py.
  c.schedule = ml_collections.ConfigDict(dict(
      reference_batch_size=256, base_lr=0.1, warmup_factor=1.0,
      warmup_interval=1, warmup_steps=0, peak_lr=0.1,
      decay_boundaries=(), decay_factor=0.1))
  c.batch_size = 256  # Global: split over all devices of all processes.
  c.num_train_steps = 1  # At the reference batch; scaled like the schedule.
  c.seed = 0

  # Fine-tuning options (finetune.py); off by default.
  c.init_checkpoint = ""  # Restore all but the head from this checkpoint.
  c.freeze_blocks = 0  # Freeze the stem and this many stages.
  # From `from_step` on (a schedule step), train at `image_size` (0 = off).
  c.progressive_resizing = ml_collections.ConfigDict(
      dict(image_size=0, from_step=0))

  # Evaluation, logging, checkpoints.
  c.eval_batch_size = 256
  c.eval_every_steps = 10_000  # 0 = only at the end.
  c.eval_at_start = False
  c.num_eval_examples = -1  # -1 = the whole split.
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2_000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.prefetch_to_device = 2  # Batches queued on the devices ahead of the step.
  return c


def train_mode(config: ml_collections.ConfigDict) -> str:
  """The preprocessing mode of the training images."""
  return "pretrain" if config.label_mode == "multi" else "finetune"


def _check_fields(config: Mapping[str, Any], schema: Mapping[str, Any],
                  prefix: str, problems: list[str]) -> None:
  """Names and types of `config` against `schema` (nested dicts of defaults)."""
  for key in config:
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      problems.append(f"unknown field {prefix}{key}{hint}")
  for key, default in schema.items():
    if key not in config:
      problems.append(f"missing field {prefix}{key}")
      continue
    value = config[key]
    if key == "preprocess":  # Free-form: PreprocessConfig checks the keys.
      if not isinstance(value, Mapping):
        problems.append(f"{prefix}{key} must be a mapping")
    elif isinstance(default, Mapping):
      if not isinstance(value, Mapping):
        problems.append(f"{prefix}{key} must be a group of fields")
      else:
        _check_fields(value, default, f"{prefix}{key}.", problems)
    elif isinstance(default, tuple):
      if not isinstance(value, (tuple, list)):
        problems.append(f"{prefix}{key} must be a tuple")
    elif isinstance(default, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{prefix}{key} must be a number, got {value!r}")
    elif not isinstance(value, type(default)) or (
        isinstance(default, int) and isinstance(value, bool)
        and not isinstance(default, bool)):
      problems.append(f"{prefix}{key} must be {type(default).__name__}, got "
                      f"{value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every problem; runs before anything compiles."""
  problems: list[str] = []
  _check_fields(config.to_dict(), base_config().to_dict(), "config.", problems)
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  if not config.dataset:
    problems.append("config.dataset is empty: name a TFDS dataset, e.g. "
                    "ml_images/full")
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
    preprocessing.PreprocessConfig.for_mode(train_mode(config),
                                            dict(config.preprocess))
  except ValueError as e:
    problems.append(f"config.preprocess: {e}")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
