"""The run's training input stream, from its config (evaluation reads its
split through evaluation/evaluator.py, as ``mlimages evaluate`` does)."""

from __future__ import annotations

import jax
import ml_collections

from mlimages_jax.inputs import pipeline
from mlimages_jax.train.config import train_mode
from mlimages_jax.train.schedule import image_size_at


def _iterator(config: ml_collections.ConfigDict, *, split: str, mode: str,
              global_batch_size: int, image_size: int
              ) -> pipeline.InputIterator:
  return pipeline.create_input_iterator(
      dataset=config.dataset, data_dir=config.data_dir or None, split=split,
      global_batch_size=global_batch_size, image_size=image_size,
      mode=mode, label_mode=config.label_mode, seed=config.seed,
      preprocess=dict(config.preprocess) or None,
      process_index=jax.process_index(), process_count=jax.process_count(),
      local_device_count=jax.local_device_count(),
      transfer_dtype=config.transfer_dtype,
      build_if_missing=config.build_dataset_if_missing)


def create_train_iterator(config: ml_collections.ConfigDict,
                          step: int = 1) -> pipeline.InputIterator:
  """This process's training stream from step number `step` on, at that
  step's image size (position 0: `set_state` moves it)."""
  return _iterator(config, split=config.train_split, mode=train_mode(config),
                   global_batch_size=config.batch_size,
                   image_size=image_size_at(config, step))
