"""Checks of a training config, derived from `config.base_config()`.

Runs before anything compiles: unknown or missing fields (with a "did you
mean"), wrong types, and values that cannot run (batch not divisible by the
devices, a loss that does not fit the label mode, frozen blocks with nothing
to load into them, ...), all listed at once. `validate_dataset` then checks
the config against the datasets' info (features, label mode, every split the
run reads), so a run on another dataset fails in seconds, naming the fix.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections

from mlimages_jax.evaluation import fewshot
from mlimages_jax.inputs import pipeline
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet
from mlimages_jax.train import optimizer
from mlimages_jax.train import schedule as schedule_lib
from mlimages_jax.train.config import LOSSES
from mlimages_jax.train.config import base_config
from mlimages_jax.train.config import train_mode
from mlimages_jax.train.config import unknown_field
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
      problems.append(unknown_field(key, schema, prefix))
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


def _check_chosen(group: str, config: ml_collections.ConfigDict,
                  fields: Mapping[str, tuple[str, ...]],
                  common: tuple[str, ...], problems: list[str]) -> None:
  """``config.<group>.name`` is known, and no field only another name reads
  differs from the base: it would be silently ignored."""
  values, defaults = config[group], base_config()[group]
  if values.name not in fields:
    problems.append(f"config.{group}.name {values.name!r} is not one of "
                    f"{sorted(fields)}")
    return
  read = (*common, *fields[values.name])
  for key, default in defaults.items():
    value = values[key]
    if isinstance(default, tuple):
      value = tuple(value)
    if key in read or value == default:
      continue
    readers = [name for name, used in fields.items() if key in used]
    problems.append(
        f"config.{group}.{key}={value!r} is read only by {group}.name "
        f"{' / '.join(readers)}, not {values.name!r}: drop it (default "
        f"{default!r}) or set config.{group}.name")


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
    fits = [name for name, mode in LOSSES.items()
            if mode == config.label_mode]
    others = f" (or {', '.join(fits[1:])})" if len(fits) > 1 else ""
    problems.append(f"config.loss.name {config.loss.name!r} needs "
                    f"label_mode {LOSSES[config.loss.name]!r}, config has "
                    f"{config.label_mode!r}: set --config.loss.name="
                    f"{fits[0]}{others}")
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
  _check_chosen("optimizer", config, optimizer.FIELDS,
                optimizer.COMMON_FIELDS, problems)
  if config.optimizer.clip_global_norm < 0:
    problems.append("config.optimizer.clip_global_norm must be >= 0 (0 = "
                    "off)")
  schedule = config.schedule
  _check_chosen("schedule", config, schedule_lib.FIELDS,
                schedule_lib.COMMON_FIELDS, problems)
  if schedule.reference_batch_size <= 0 or schedule.warmup_interval <= 0:
    problems.append("config.schedule.reference_batch_size and "
                    "warmup_interval must be > 0")
  if schedule.warmup_epochs < 0 or (schedule.warmup_epochs and (
      schedule.warmup_steps or schedule.train_examples <= 0)):
    problems.append(
        "config.schedule.warmup_epochs must be >= 0 and, when > 0, needs "
        "schedule.train_examples (images per epoch) > 0 and warmup_steps 0")
  elif (config.batch_size > 0 and schedule.reference_batch_size > 0
        and schedule.warmup_interval > 0):
    warmup = schedule_lib.warmup_steps(config)
    boundaries = [schedule_lib.scaled_steps(b, config)
                  for b in schedule.decay_boundaries]
    if boundaries != sorted(boundaries) or (
        boundaries and boundaries[0] < warmup):
      problems.append("config.schedule.decay_boundaries must be ascending "
                      "and >= the warm-up's steps")
    if schedule.name == "warmup_cosine" and warmup >= (
        schedule_lib.num_train_steps(config)):
      problems.append("config.schedule.name 'warmup_cosine' needs a warm-up "
                      "shorter than num_train_steps")
  if schedule.rate_at_boundary not in RATES_AT_BOUNDARY:
    problems.append(f"config.schedule.rate_at_boundary "
                    f"{schedule.rate_at_boundary!r} is not one of "
                    f"{RATES_AT_BOUNDARY}")
  num_stages = len(resnet.STAGE_SIZES.get(config.model.depth, ()))
  if not 0 <= config.freeze_blocks <= num_stages:
    problems.append(f"config.freeze_blocks must be in 0..{num_stages} (the "
                    f"stem plus that many stages), got {config.freeze_blocks}")
  elif config.freeze_blocks and not config.init_checkpoint:
    problems.append(
        f"config.freeze_blocks={config.freeze_blocks} without "
        "config.init_checkpoint would freeze the stem and stages at their "
        "random initialisation: set --config.init_checkpoint=<pre-training "
        "workdir or checkpoint>, or --config.freeze_blocks=0 to train "
        "everything from scratch")
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


def _split_problem(builder: Any, field: str, split: str, *,
                   names_only: bool = False, fix: bool = True) -> str | None:
  """Why `split` (the value of config field `field`) cannot be read, or None.

  TFDS split expressions (``train[:90%]``) are fine unless `names_only`:
  the evaluator reads whole named splits. With `fix`, names the flag to set.
  """
  names = sorted(builder.info.splits)
  if split in names:
    return None
  if not names_only:
    try:
      builder.info.splits[split]
      return None
    except (KeyError, ValueError, AssertionError):
      pass
  problem = (f"{field} {split!r}: {builder.info.full_name} has no such split "
             f"(splits: {', '.join(names)})")
  if not fix:
    return problem
  others = [n for n in names if n != "train"]
  return (f"{problem}; set --{field}="
          f"{others[0] if len(others) == 1 else '<one of them>'}")


def _label_mode_problem(builder: Any, config: ml_collections.ConfigDict,
                        error: ValueError) -> str:
  """The one-line fix when the dataset's features do not fit the label mode."""
  name, features = builder.info.full_name, builder.info.features
  if config.label_mode == "multi" and "label" in features:
    return (f"{name} has a single `label` per image, not the multi-label "
            "`labels`/`confidences` of config.label_mode='multi': set "
            "--config.label_mode=single --config.loss.name=softmax")
  if config.label_mode == "single" and "labels" in features:
    return (f"{name} has multi-label `labels`, not the `label` of "
            "config.label_mode='single': set --config.label_mode=multi "
            "--config.loss.name=adaptive_sigmoid")
  return f"config.dataset {name}: {error}"


def validate_dataset(config: ml_collections.ConfigDict
                     ) -> pipeline.DatasetInfo:
  """Checks the datasets a run reads against its config, from their info.

  Runs after `validate_config`, before anything heavy is built: the training
  dataset's features against the label mode (and loss), and every split the
  run reads (train, eval, each few-shot dataset's two). Raises ConfigError
  listing every problem with its fix, or pipeline.DatasetNotBuiltError with
  the build command (it builds ml_images/synthetic when the config asks);
  returns the training dataset's classes and splits.
  """
  data_dir = config.data_dir or None
  builder = pipeline.load_builder(
      config.dataset, data_dir,
      build_if_missing=config.build_dataset_if_missing)
  problems = []
  info = None
  try:
    info = pipeline.dataset_info(config.dataset, data_dir,
                                 label_mode=config.label_mode)
  except ValueError as e:
    problems.append(_label_mode_problem(builder, config, e))
  problems += [
      _split_problem(builder, "config.train_split", config.train_split),
      # Every run ends with an evaluation, whatever eval_every_steps says.
      _split_problem(builder, "config.eval_split", config.eval_split,
                     names_only=True)]
  if config.fewshot.every_steps:
    fewshot_dir = config.fewshot.data_dir or data_dir
    for i, task in enumerate(fewshot.tasks_from_config(
        config.fewshot.datasets)):
      field = f"config.fewshot.datasets[{i}]"
      task_builder = pipeline.load_builder(task.dataset, fewshot_dir)
      try:
        pipeline.dataset_info(task.dataset, fewshot_dir, label_mode="single")
      except ValueError as e:
        problems.append(f"{field}: few-shot probes need a single-label "
                        f"dataset: {e}")
      problems += [_split_problem(task_builder, field, split, fix=False)
                   for split in (task.train_split, task.test_split)]
  problems = [p for p in problems if p]
  if problems:
    raise ConfigError("invalid config for its dataset:\n  "
                      + "\n  ".join(problems))
  return info
