"""Tests of mlimages_jax.train.loop (runs through main.py: test_main.py)."""

from __future__ import annotations

import pathlib
import sys

import pytest

from mlimages_jax.checkpoints import store
from mlimages_jax.inputs import pipeline
from mlimages_jax.train import loop

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402


def _fail(what: str):
  def fail(*args, **kwargs):
    raise AssertionError(f"{what} (args {args}, {kwargs})")
  return fail


def test_missing_dataset_fails_fast_with_build_command(tmp_path, monkeypatch):
  """Before the model is even built (so before anything compiles)."""
  config = pretrain.get_config()  # The full recipe: ml_images/full.
  config.data_dir = str(tmp_path)
  monkeypatch.setattr(loop, "create_model",
                      _fail("built the model before reading the dataset"))
  with pytest.raises(pipeline.DatasetNotBuiltError,
                     match=r"tfds build ml_images --imports=mlimages_jax\."
                           r"datasets\.ml_images --config=full"):
    loop.train_and_evaluate(config, tmp_path / "work")
  assert not (tmp_path / "work" / "checkpoints").exists()


@pytest.mark.slow
def test_checkpoints_record_the_datasets_label_closure(tmp_path):
  """A real build with the annotations as given: every checkpoint says so.
  The run accumulates 2 micro-batches in positivity groups of 4."""
  from mlimages_jax.datasets.ml_images import ml_images_dataset_builder as mib
  config_name = "synthetic_as_given"
  mib.Builder(config=mib.MlImagesConfig(
      name=config_name, kind="synthetic", parts=(), num_train=32,
      num_validation=16, image_size=32, label_closure="as_given"),
              data_dir=str(tmp_path / "data")).download_and_prepare()
  config = pretrain.get_config("smoke")
  config.dataset = f"ml_images/{config_name}"
  config.data_dir = str(tmp_path / "data")
  config.num_train_steps = 2
  config.eval_batch_size = 8
  config.num_eval_examples = -1
  config.accumulate_steps = 2
  config.loss.positivity_batch_size = 4
  loop.train_and_evaluate(config, tmp_path / "work")
  checkpoints = store.TrainCheckpointer(tmp_path / "work")
  metadata = checkpoints.metadata(checkpoints.latest_step())
  checkpoints.close()
  assert metadata["step"] == 2
  assert metadata["label_closure"] == "as_given"
