"""Checks of a training config, derived from `config.base_config()`.

Runs before anything compiles: unknown or missing fields (with a "did you
mean"), wrong types, and values that cannot run (batch not divisible by the
devices, a loss that does not fit the label mode, ...), all listed at once.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import jax
import ml_collections

from mlimages_jax.evaluation import fewshot
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet
from mlimages_jax.train.config import LOSSES
from mlimages_jax.train.config import base_config
from mlimages_jax.train.config import train_mode
from mlimages_jax.train.finetune import FROZEN_BLOCKS_BATCH_STATS
from mlimages_jax.train.schedule import RATES_AT_BOUNDARY
from mlimages_jax.train.state import DTYPES


class ConfigError(ValueError):
  """The training config cannot run (raised before any compilation)."""


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
    if isinstance(default, Mapping):
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
  per_device = config.batch_size // devices
  if config.accumulate_steps <= 0 or per_device % config.accumulate_steps:
    problems.append(
        f"config.accumulate_steps={config.accumulate_steps} must be >= 1 and "
        f"divide the per-device batch ({config.batch_size} over {devices} "
        f"devices = {per_device})")
  group = config.loss.positivity_batch_size
  if group < 0 or (group and config.batch_size % group):
    problems.append(
        f"config.loss.positivity_batch_size={group} must be 0 (the whole "
        f"global batch) or divide config.batch_size={config.batch_size}")
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
  if schedule.rate_at_boundary not in RATES_AT_BOUNDARY:
    problems.append(f"config.schedule.rate_at_boundary "
                    f"{schedule.rate_at_boundary!r} is not one of "
                    f"{RATES_AT_BOUNDARY}")
  num_stages = len(resnet.STAGE_SIZES.get(config.model.depth, ()))
  if not 0 <= config.freeze_blocks <= num_stages:
    problems.append(f"config.freeze_blocks must be in 0..{num_stages} (the "
                    f"stem plus that many stages), got {config.freeze_blocks}")
  if config.frozen_blocks_batch_stats not in FROZEN_BLOCKS_BATCH_STATS:
    problems.append(f"config.frozen_blocks_batch_stats "
                    f"{config.frozen_blocks_batch_stats!r} is not one of "
                    f"{FROZEN_BLOCKS_BATCH_STATS}")
  resize = config.progressive_resizing
  if resize.image_size < 0 or resize.from_step < 0:
    problems.append("config.progressive_resizing.image_size and from_step "
                    "must be >= 0")
  try:
    preprocessing.PreprocessConfig.for_mode(train_mode(config),
                                            dict(config.preprocess))
  except ValueError as e:
    problems.append(f"config.preprocess: {e}")
  if config.profile.num_steps < 0 or config.profile.after_steps < 0:
    problems.append("config.profile.num_steps and after_steps must be >= 0 "
                    "(num_steps 0 = off)")
  if config.fewshot.every_steps < 0:
    problems.append("config.fewshot.every_steps must be >= 0 (0 = off)")
  elif config.fewshot.every_steps:
    try:
      fewshot.from_config(config.fewshot, config.data_dir or None)
    except ValueError as e:
      problems.append(f"config.fewshot: {e}")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
