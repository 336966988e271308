"""Tests of mlimages_jax.train.loop (runs through main.py: test_main.py)."""

from __future__ import annotations

import pathlib
import sys
import time

import pytest

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
