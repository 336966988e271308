"""Tests of mlimages_jax.train.loop (runs through main.py: test_main.py)."""

from __future__ import annotations

import json
import pathlib
import sys
import time

import pytest

from mlimages_jax.checkpoints import store
from mlimages_jax.inputs import pipeline
from mlimages_jax.train import loop

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402


def test_missing_dataset_fails_fast_with_build_command(tmp_path):
  config = pretrain.get_config()  # The full recipe: ml_images/full.
  config.data_dir = str(tmp_path)
  start = time.perf_counter()
  with pytest.raises(pipeline.DatasetNotBuiltError,
                     match=r"tfds build ml_images --imports=mlimages_jax\."
                           r"datasets\.ml_images --config=full"):
    loop.train_and_evaluate(config, tmp_path / "work")
  assert time.perf_counter() - start < 20
  assert not (tmp_path / "work" / "checkpoints").exists()


@pytest.mark.slow
def test_checkpoints_record_the_datasets_label_closure(tmp_path):
  """A real build with the annotations as given: every checkpoint says so.
  The run accumulates 2 micro-batches in positivity groups of 4. The build
  is stored as array_record: training reads it by index, and the checkpoint
  holds that iterator's position."""
  from mlimages_jax.datasets.ml_images import ml_images_dataset_builder as mib
  config_name = "synthetic_as_given"
  mib.Builder(config=mib.MlImagesConfig(
      name=config_name, kind="synthetic", parts=(), num_train=32,
      num_validation=16, image_size=32, label_closure="as_given"),
              data_dir=str(tmp_path / "data"),
              file_format="array_record").download_and_prepare()
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
  [position] = (tmp_path / "work").glob("**/2/**/process_0-of-1.bin")
  position = json.loads(position.read_bytes())
  assert position["file_format"] == "array_record"
  assert (position["epoch"], position["position"]) == (0, 32)
