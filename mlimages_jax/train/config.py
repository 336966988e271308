"""The training config: every field declared once.

`base_config()` is the one place a field exists, with its type (from its
default) and what it means. The recipes in ``configs/`` start from it and
override values; `config_validation` derives its schema from it, so a field
added here is known everywhere and a typo on the command line or in a recipe
is an error before anything compiles, never a silent default. This module
imports only ml_collections: loading a recipe stays instant.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import ml_collections

# Loss name -> the label mode it trains on.
LOSSES = {"adaptive_sigmoid": "multi", "sigmoid": "multi", "softmax": "single"}


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
  # Image preprocessing (inputs/preprocessing.py's PreprocessConfig, which
  # says what each field does): the §7 pre-training values. Training reads
  # all of it; evaluation only eval_crop_fraction, antialias, eval_dct_method.
  c.preprocess = ml_collections.ConfigDict(dict(
      area_range=(0.7, 1.0), aspect_ratio_range=(0.75, 1.33),
      min_object_covered=0.7, max_attempts=100, flip=True,
      rotation_fraction=1 / 3, max_rotation_degrees=45.0,
      rotation_interpolation="nearest", colour_fraction=2 / 3,
      colour_on_device=True, brightness_delta=32 / 255,
      saturation_range=(0.5, 1.5), hue_delta=0.2, contrast_range=(0.5, 1.5),
      eval_crop_fraction=0.8, antialias=False, dct_method="INTEGER_FAST",
      eval_dct_method="INTEGER_ACCURATE"))

  # Model and loss.
  c.model = ml_collections.ConfigDict(dict(
      depth=101, width_multiplier=1.0, bn_momentum=0.997,
      sync_batch_norm=False))
  c.dtype = "bfloat16"  # Compute dtype; parameters stay float32.
  c.loss = ml_collections.ConfigDict(dict(
      name="adaptive_sigmoid", pos_weight=12.0, mask_thres=0.7,
      neg_select=0.1,  # The §7 values; only adaptive_sigmoid reads them.
      # Examples per positivity group (the original: one GPU's batch); the
      # counters advance once per group. 0 = the whole global batch.
      positivity_batch_size=0))

  # Optimisation (optimizer.py, schedule.py: `FIELDS` there says which
  # fields each name reads; setting another one's is an error).
  # optimizer.name: "sgd" (the recipe's: heavy-ball momentum, L2 added to the
  # loss, BN at weight_decay_bn), or optax's "lars" (momentum,
  # trust_coefficient), "lamb" or "adamw" (b1, b2, eps), whose weight_decay
  # is decoupled and skips BN and biases. clip_global_norm: 0 = off.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", momentum=0.9, weight_decay=1e-4, weight_decay_bn=0.0,
      trust_coefficient=0.001, b1=0.9, b2=0.999, eps=1e-6,
      clip_global_norm=0.0))
  # Written for `reference_batch_size` images per step; see schedule.py.
  # schedule.name: "recipe" (staircase exponential warm-up, then step decay),
  # "warmup_cosine" (linear warm-up, cosine to end_lr) or "warmup_step"
  # (linear warm-up, then step decay). Warm-up: warmup_steps, or
  # warmup_epochs (> 0) epochs of train_examples images per epoch.
  # rate_at_boundary: "previous" (a boundary step keeps the old rate, TF's
  # piecewise_constant) or "decayed" (TF's staircase exponential_decay).
  c.schedule = ml_collections.ConfigDict(dict(
      name="recipe", reference_batch_size=256, base_lr=0.1,
      warmup_factor=1.0, warmup_interval=1, warmup_steps=0,
      warmup_epochs=0.0, train_examples=0, peak_lr=0.1, end_lr=0.0,
      decay_boundaries=(), decay_factor=0.1, rate_at_boundary="previous"))
  c.batch_size = 256  # Global: split over all devices of all processes.
  # Micro-batches per step: each device's share of the batch is cut into this
  # many, their gradients summed (1 = off). Same update, less memory.
  c.accumulate_steps = 1
  c.num_train_steps = 1  # At the reference batch; scaled like the schedule.
  c.seed = 0

  # Fine-tuning options (finetune.py); off by default.
  c.init_checkpoint = ""  # Restore all but the head from this checkpoint.
  c.freeze_blocks = 0  # Freeze the stem and this many stages.
  # The frozen blocks' BN moving averages: "update" (they keep following the
  # batches, as the original's FixBlock2, whose BN layers stay in training
  # mode with UPDATE_OPS run) or "keep" (left as loaded: the frozen blocks
  # stay bit-identical to the checkpoint). Both normalise with batch stats.
  c.frozen_blocks_batch_stats = "update"
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
  # A jax.profiler trace of `num_steps` steps (0 = off) into W/profile
  # (TensorBoard's profile tab), starting once this run (fresh or resumed)
  # has done `after_steps` steps: after compilation and the input warm-up.
  # Process 0 only.
  c.profile = ml_collections.ConfigDict(dict(num_steps=0, after_steps=10))

  # Few-shot linear probes of the backbone (evaluation/fewshot.py): ridge
  # regression on k frozen features per class, accuracy on a test split.
  c.fewshot = ml_collections.ConfigDict(dict(
      every_steps=0,  # 0 = off; also run at the end (and start, with
                      # eval_at_start) when on.
      datasets=(),  # (tfds name, train split, test split), e.g.
                    # (("cifar100", "train", "test"),).
      shots=(1, 5, 10, 25), seeds=(0, 1, 2), l2_reg=1024.0,
      image_size=0,  # 0 = the training image size at that step.
      batch_size=256,  # Global, like eval_batch_size.
      pool_per_class=50,  # Train examples kept per class; shots drawn here.
      num_test_examples=10_000,  # -1 = the whole test split.
      data_dir=""))  # "" = config.data_dir.
  return c


def train_mode(config: ml_collections.ConfigDict) -> str:
  """The preprocessing mode of the training images."""
  return "pretrain" if config.label_mode == "multi" else "finetune"


def unknown_field(key: str, schema: Mapping[str, Any], prefix: str) -> str:
  """The error for field `prefix + key` that `schema` lacks: did you mean?"""
  close = difflib.get_close_matches(key, list(schema), n=1)
  hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
  return f"unknown field {prefix}{key}{hint}"


def override_problem(path: str) -> str | None:
  """What is wrong with overriding field `path` (e.g. "model.dept"), or None
  if `base_config()` has it: main.py's one-line error for a --config.PATH
  that ml_collections refuses with a traceback (kept light: no JAX)."""
  schema: Any = base_config().to_dict()
  prefix = "config."
  for key in path.split("."):
    if not isinstance(schema, Mapping) or key not in schema:
      return unknown_field(
          key, schema if isinstance(schema, Mapping) else {}, prefix)
    schema, prefix = schema[key], f"{prefix}{key}."
  return None
