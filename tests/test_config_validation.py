"""Tests of mlimages_jax.train.config and config_validation: one base config,
the recipes only override it, validation derives its schema from it."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from mlimages_jax.inputs import pipeline
from mlimages_jax.train import config as config_lib
from mlimages_jax.train import config_validation
from mlimages_jax.train import schedule

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import finetune_imagenet  # noqa: E402
from configs import pretrain  # noqa: E402


def test_unknown_field_is_rejected_with_a_suggestion():
  config = pretrain.get_config("smoke")
  config.unlock()
  config.model.dept = 50
  with pytest.raises(
      config_validation.ConfigError,
      match=r"unknown field "
      r"config\.model\.dept \(did you mean config\.model\.depth"):
    config_validation.validate_config(config)


def test_bad_types_loss_and_batch_are_rejected():
  config = pretrain.get_config("smoke")
  config.batch_size = 12  # Not divisible by 8 devices.
  config.loss.name = "softmax"  # Needs single labels.
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert "config.batch_size=12 is not divisible by the 8 devices" in str(e.value)
  assert ("config.loss.name 'softmax' needs label_mode 'single', config has "
          "'multi': set --config.loss.name=adaptive_sigmoid (or sigmoid)"
          ) in str(e.value)


def test_accumulation_and_positivity_groups_must_divide_the_batch():
  config = pretrain.get_config("smoke")  # 16 images over 8 devices.
  config.accumulate_steps = 4
  config.loss.positivity_batch_size = 6
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert ("config.accumulate_steps=4 must be >= 1 and divide the per-device "
          "batch (16 over 8 devices = 2)") in str(e.value)
  assert ("config.loss.positivity_batch_size=6 must be 0 (the whole global "
          "batch) or divide config.batch_size=16") in str(e.value)
  config.accumulate_steps = 2
  config.loss.positivity_batch_size = 4
  config_validation.validate_config(config)


@pytest.mark.parametrize("recipe,variant", [
    (pretrain, None), *((pretrain, v) for v in pretrain.VARIANTS),
    (finetune_imagenet, None), (finetune_imagenet, "demo"),
    (finetune_imagenet, "smoke")])
def test_recipes_only_override_the_base(recipe, variant):
  """Every recipe has exactly the base's fields, of the base's types."""
  base = config_lib.base_config().to_dict()
  config = recipe.get_config(variant).to_dict()

  def shape(tree):
    return {k: shape(v) if isinstance(v, dict) else type(v)
            for k, v in tree.items()}

  assert shape(config) == shape(base)


def test_validation_schema_is_the_base_config():
  """A field the base declares is required; one it lacks is unknown."""
  config = pretrain.get_config("smoke")
  config.unlock()
  del config.schedule["decay_factor"]
  config.schedule.decay_rate = 0.1
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert "missing field config.schedule.decay_factor" in str(e.value)
  assert "unknown field config.schedule.decay_rate" in str(e.value)


def test_base_config_needs_only_a_dataset():
  config = config_lib.base_config()
  with pytest.raises(config_validation.ConfigError,
                     match="config.dataset is empty"):
    config_validation.validate_config(config)
  config.dataset = "ml_images/synthetic"
  config_validation.validate_config(config)


def test_enumerated_fields_are_checked():
  config = finetune_imagenet.get_config("smoke")
  config.frozen_blocks_batch_stats = "frozen"
  config.schedule.rate_at_boundary = "after"
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert ("config.frozen_blocks_batch_stats 'frozen' is not one of "
          "('update', 'keep')") in str(e.value)
  assert ("config.schedule.rate_at_boundary 'after' is not one of "
          "('previous', 'decayed')") in str(e.value)


@pytest.mark.parametrize("recipe,mode", [(pretrain, "pretrain"),
                                         (finetune_imagenet, "finetune")])
def test_preprocess_group_holds_every_preprocessing_field(recipe, mode):
  """config.preprocess declares every PreprocessConfig field, at the values
  the library's defaults for that recipe's mode give (so the two cannot
  drift), and the pipeline receives exactly those."""
  from mlimages_jax.inputs import preprocessing
  declared = recipe.get_config().preprocess.to_dict()
  defaults = dataclasses.asdict(preprocessing.PreprocessConfig.for_mode(mode))
  assert declared == defaults
  assert preprocessing.PreprocessConfig.for_mode(mode, declared) == (
      preprocessing.PreprocessConfig.for_mode(mode))


def _parse_flags(*args: str):
  """The recipe as main.py's --config flag parses it, with overrides."""
  argv = ["main.py", f"--config={pathlib.Path(pretrain.__file__)}", *args]
  flag_values = flags.FlagValues()
  # The override flags are defined from the command line, as in main.py.
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_preprocess_fields_are_overridable_typed_and_validated():
  """The full recipe's preprocessing, overridden on the command line."""
  config = _parse_flags("--config.preprocess.colour_fraction=0.5",
                        "--config.preprocess.area_range=(0.5,0.9)",
                        "--config.preprocess.flip=False")
  assert config.preprocess.colour_fraction == 0.5
  assert tuple(config.preprocess.area_range) == (0.5, 0.9)
  assert config.preprocess.flip is False
  config_validation.validate_config(config)
  config = _parse_flags("--config.preprocess.colour_fraction=1.5",
                        "--config.preprocess.dct_method=FAST")
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert "colour_fraction must be in [0, 1], got 1.5" in str(e.value)
  assert "dct_method must be one of" in str(e.value)
  config = pretrain.get_config("smoke")  # A recipe replacing the group:
  config.preprocess = ml_collections.ConfigDict(dict(
      config.preprocess.to_dict(), colour_fracton=0.5, hue_delta="0.1"))
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert ("unknown field config.preprocess.colour_fracton (did you mean "
          "config.preprocess.colour_fraction?)") in str(e.value)
  assert "config.preprocess.hue_delta must be a number" in str(e.value)


def test_frozen_blocks_need_a_checkpoint_to_load():
  """The §8 recipe without init_checkpoint would freeze random layers."""
  config = finetune_imagenet.get_config()
  assert config.freeze_blocks == 2 and not config.init_checkpoint
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert ("config.freeze_blocks=2 without config.init_checkpoint would "
          "freeze the stem and stages at their random initialisation: set "
          "--config.init_checkpoint=<pre-training workdir or checkpoint>, or "
          "--config.freeze_blocks=0 to train everything from scratch"
          ) in str(e.value)
  config.freeze_blocks = 0  # Said explicitly: from scratch.
  config_validation.validate_config(config)
  config.freeze_blocks, config.init_checkpoint = 2, "/runs/pretrain"
  config_validation.validate_config(config)


def test_override_problem_names_the_field_and_a_suggestion():
  assert config_lib.override_problem("model.depth") is None
  assert config_lib.override_problem("model.dept") == (
      "unknown field config.model.dept (did you mean config.model.depth?)")
  assert config_lib.override_problem("modl.depth") == (
      "unknown field config.modl (did you mean config.model?)")
  assert config_lib.override_problem("dataset.name") == (
      "unknown field config.dataset.name")


def test_another_dataset_gets_every_fix_in_one_error(shapes_dir):
  """configs/pretrain.py pointed at a single-label dataset: the label mode,
  the loss and the missing split are named together, each with its flag;
  applying them passes."""
  config = pretrain.get_config("smoke")
  config.dataset, config.data_dir = "synth_shapes", shapes_dir
  config_validation.validate_config(config)  # Consistent in itself.
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_dataset(config)
  assert str(e.value).splitlines() == [
      "invalid config for its dataset:",
      "  synth_shapes/1.0.0 has a single `label` per image, not the "
      "multi-label `labels`/`confidences` of config.label_mode='multi': set "
      "--config.label_mode=single --config.loss.name=softmax",
      "  config.eval_split 'validation': synth_shapes/1.0.0 has no such split "
      "(splits: test, train); set --config.eval_split=test"]
  config.label_mode, config.loss.name = "single", "softmax"
  config.eval_split = "test"
  config_validation.validate_config(config)
  info = config_validation.validate_dataset(config)
  assert info.num_classes == 6 and info.split_sizes == {"train": 120,
                                                        "test": 240}
  config.train_split = "train[:50%]"  # TFDS split expressions are fine.
  config_validation.validate_dataset(config)


def test_fewshot_datasets_and_splits_are_checked(shapes_dir):
  config = pretrain.get_config("smoke")
  config.dataset, config.data_dir = "synth_shapes", shapes_dir
  config.label_mode, config.loss.name = "single", "softmax"
  config.eval_split = "test"
  config.fewshot.every_steps = 3
  config.fewshot.datasets = (("synth_shapes", "train", "validation"),)
  with pytest.raises(config_validation.ConfigError,
                     match=r"config\.fewshot\.datasets\[0\] 'validation': "
                     r"synth_shapes/1\.0\.0 has no such split"):
    config_validation.validate_dataset(config)
  config.fewshot.datasets = (("cifar100", "train", "test"),)
  with pytest.raises(pipeline.DatasetNotBuiltError,
                     match="tfds build cifar100"):
    config_validation.validate_dataset(config)


def test_optimizer_and_schedule_by_name_from_the_command_line():
  config = _parse_flags("--config.optimizer.name=lars",
                        "--config.optimizer.trust_coefficient=0.02",
                        "--config.optimizer.clip_global_norm=1.0",
                        "--config.schedule.name=warmup_step",
                        "--config.schedule.warmup_factor=1.0",
                        "--config.schedule.warmup_interval=1")
  assert (config.optimizer.name, config.optimizer.trust_coefficient) == (
      "lars", 0.02)
  config_validation.validate_config(config)


def test_unknown_names_and_fields_of_another_name_are_rejected():
  config = _parse_flags("--config.optimizer.name=adam",
                        "--config.schedule.name=cosine")
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert ("config.optimizer.name 'adam' is not one of ['adamw', 'lamb', "
          "'lars', 'sgd']") in str(e.value)
  assert ("config.schedule.name 'cosine' is not one of ['recipe', "
          "'warmup_cosine', 'warmup_step']") in str(e.value)
  # The full recipe's staircase warm-up fields mean nothing to a cosine.
  config = _parse_flags("--config.optimizer.b1=0.95",
                        "--config.schedule.name=warmup_cosine")
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(config)
  assert ("config.optimizer.b1=0.95 is read only by optimizer.name lamb / "
          "adamw, not 'sgd': drop it (default 0.9) or set "
          "config.optimizer.name") in str(e.value)
  assert ("config.schedule.warmup_factor=1.297 is read only by schedule.name "
          "recipe, not 'warmup_cosine'") in str(e.value)
  assert "config.schedule.decay_boundaries=(110000," in str(e.value)


def test_warmup_in_epochs_needs_the_epoch_size():
  config = pretrain.get_config("smoke")
  config.schedule.warmup_epochs = 1.0
  with pytest.raises(config_validation.ConfigError,
                     match=r"warmup_epochs must be >= 0 and, when > 0, needs "
                     r"schedule.train_examples \(images per epoch\) > 0 and "
                     r"warmup_steps 0"):
    config_validation.validate_config(config)
  config.schedule.warmup_steps = 0
  config.schedule.train_examples = 160  # 10 steps of 16, within 1st decay.
  config.schedule.decay_boundaries = (20,)
  config_validation.validate_config(config)


def test_large_batch_variant_keeps_the_recipes_epochs_at_its_own_rates():
  full, large = pretrain.get_config(), pretrain.get_config("large_batch")
  config_validation.validate_config(large)

  def images(steps: int, config) -> int:
    return steps * config.batch_size

  # The same 60 epochs, warm-up and decays, in images.
  assert (images(schedule.num_train_steps(large), large)
          == images(schedule.num_train_steps(full), full))
  assert (images(schedule.warmup_steps(large), large)
          == images(schedule.warmup_steps(full), full))
  assert ([images(b, large) for b in large.schedule.decay_boundaries]
          == [images(b, full) for b in full.schedule.decay_boundaries])
  # Its rates are the ones it says (no linear scaling), AdamW's, with the
  # class positivity counted per 16 examples.
  assert schedule.schedule_scale(large) == 1
  rate = schedule.create_learning_rate_fn(large)
  assert float(rate(0)) == pytest.approx(0.001)
  assert float(rate(4_401)) == pytest.approx(0.008)
  assert float(rate(13_751)) == pytest.approx(0.0008)
  assert large.optimizer.name == "adamw"
  assert large.loss.positivity_batch_size == 16
