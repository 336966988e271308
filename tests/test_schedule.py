"""Tests of mlimages_jax.train.schedule: the §7 schedule and batch scaling."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

from mlimages_jax.train import schedule as schedule_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402


def reference_lr(step: int, batch: int = 2048) -> float:
  """§7 transcribed literally (NumPy/Python), with linear batch scaling."""
  scale = batch / 2048
  step = step * scale  # Steps at the reference batch.
  if step < 35_200:
    lr = 0.01 * 1.297 ** np.floor(step / 4_400)
  else:
    lr = 0.08 * 0.1 ** sum(step >= b for b in (110_000, 220_000, 330_000,
                                                440_000))
  return lr * scale


def test_full_recipe_schedule_matches_reference():
  config = pretrain.get_config()
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  steps = [0, 1, 4_399, 4_400, 8_800, 30_799, 30_800, 35_199, 35_200,
           109_999, 110_000, 219_999, 220_000, 330_000, 439_999, 440_000]
  got = np.array([float(lr_fn(s)) for s in steps])
  want = np.array([reference_lr(s) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Landmarks of §7: ~0.08 at the end of the warm-up, then exactly 0.08.
  assert float(lr_fn(35_199)) == pytest.approx(0.01 * 1.297 ** 7, rel=1e-6)
  assert float(lr_fn(35_200)) == pytest.approx(0.08, rel=1e-6)
  assert schedule_lib.num_train_steps(config) == 440_000


def test_schedule_scales_with_global_batch():
  config = pretrain.get_config()
  config.batch_size = 4096  # 2x the reference: 2x LR, half the steps.
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  steps = [0, 2_199, 2_200, 17_599, 17_600, 54_999, 55_000, 164_999, 165_000]
  got = np.array([float(lr_fn(s)) for s in steps])
  want = np.array([reference_lr(s, 4096) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert schedule_lib.num_train_steps(config) == 220_000
