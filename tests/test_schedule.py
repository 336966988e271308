"""Tests of mlimages_jax.train.schedule: the original's schedules, exactly.

Two oracles: a transcription (in our words, float64) of the original's
learning-rate code, and that code's TF functions evaluated by TF itself
(tf.compat.v1.train.piecewise_constant / exponential_decay in a TF1 graph).
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np
import pytest
import tensorflow as tf

from mlimages_jax.train import config as config_lib
from mlimages_jax.train import config_validation
from mlimages_jax.train import schedule as schedule_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import finetune_imagenet  # noqa: E402
from configs import pretrain  # noqa: E402

# The original's example/train.sh and example/finetune.sh values.
PRETRAIN = dict(lr=0.08, lr_decay_step=110_000, warmup=35_200,
                lr_warmup=0.01, lr_warmup_decay_step=4_400,
                lr_warmup_decay_factor=1.297)
FINETUNE = dict(lr=0.1, lr_decay_step=150_000, lr_decay_factor=0.1)


def original_pretrain_lr(global_step: int) -> float:
  """train.py: staircase warm-up, then piecewise_constant (x <= boundary
  keeps the old value) over 4 boundaries with decays 1 .. 1e-4."""
  f = PRETRAIN
  if global_step < f["warmup"]:
    return f["lr_warmup"] * f["lr_warmup_decay_factor"] ** math.floor(
        global_step / f["lr_warmup_decay_step"])
  boundaries = [f["lr_decay_step"] * epoch for epoch in (1, 2, 3, 4)]
  values = [f["lr"] * decay for decay in (1, 0.1, 0.01, 1e-3, 1e-4)]
  for boundary, value in zip(boundaries, values):
    if global_step <= boundary:
      return value
  return values[-1]


def original_finetune_lr(global_step: int) -> float:
  """finetune.py: exponential_decay(lr, step, decay_step, factor,
  staircase=True)."""
  f = FINETUNE
  return f["lr"] * f["lr_decay_factor"] ** math.floor(
      global_step / f["lr_decay_step"])


def _tf_original_rates(kind: str, global_steps: list[int]) -> np.ndarray:
  """The original's schedule built from TF's own functions, per step."""
  with tf.Graph().as_default():
    step = tf.compat.v1.placeholder(tf.int64, [])
    v1 = tf.compat.v1.train
    if kind == "pretrain":
      f = PRETRAIN
      piecewise = v1.piecewise_constant(
          tf.cast(step, tf.int32),
          [int(f["lr_decay_step"] * e) for e in (1, 2, 3, 4)],
          [f["lr"] * d for d in (1, 0.1, 0.01, 1e-3, 1e-4)])
      rate = tf.cond(step < f["warmup"], lambda: v1.exponential_decay(
          f["lr_warmup"], step, f["lr_warmup_decay_step"],
          f["lr_warmup_decay_factor"], staircase=True), lambda: piecewise)
    else:
      f = FINETUNE
      rate = v1.exponential_decay(f["lr"], step, f["lr_decay_step"],
                                  f["lr_decay_factor"], staircase=True)
    with tf.compat.v1.Session() as session:
      return np.float32([session.run(rate, {step: s}) for s in global_steps])


def _around(boundaries, last: int) -> list[int]:
  """Every step from 2 before to 2 after each boundary, plus the ends."""
  steps = {0, 1, last}
  for b in boundaries:
    steps.update(s for s in range(b - 2, b + 3) if 0 <= s <= last)
  return sorted(steps)


PRETRAIN_STEPS = _around(
    [4_400 * k for k in range(1, 9)]
    + [110_000 * k for k in range(1, 5)], 439_999)
# The original's loop also runs step 600,000 (at 1e-5); ours stops before it.
FINETUNE_STEPS = _around([150_000 * k for k in range(1, 4)], 599_999)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_recipes_reproduce_the_original_schedule_at_every_boundary(kind):
  recipe, oracle, steps = {
      "pretrain": (pretrain, original_pretrain_lr, PRETRAIN_STEPS),
      "finetune": (finetune_imagenet, original_finetune_lr, FINETUNE_STEPS),
  }[kind]
  config = recipe.get_config()
  config.init_checkpoint = "/runs/r101"  # The §8 recipe fine-tunes one.
  config_validation.validate_config(config)
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  ours = np.float32([lr_fn(s) for s in steps])
  # float32 rates vs float64 oracle: 6e-8 relative rounding; the wrong side
  # of a boundary is off by >= 22% (x1.297) or 90% (x0.1).
  np.testing.assert_allclose(ours, [oracle(s) for s in steps], rtol=1e-6)
  # TF's own float32 values: ours are computed as TF does (Python-float
  # piecewise values; pow then multiply in float32 for exponential_decay);
  # 1 ulp allows for a libm whose powf rounds differently (0 measured here).
  np.testing.assert_array_max_ulp(ours, _tf_original_rates(kind, steps),
                                  maxulp=1)


def test_boundary_step_keeps_or_decays_by_rate_at_boundary():
  config = pretrain.get_config()
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  assert [float(lr_fn(s)) for s in (110_000, 110_001)] == pytest.approx(
      [0.08, 0.008], rel=1e-6)
  config.schedule.rate_at_boundary = "decayed"
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  assert [float(lr_fn(s)) for s in (109_999, 110_000)] == pytest.approx(
      [0.08, 0.008], rel=1e-6)
  config.schedule.rate_at_boundary = "next"
  with pytest.raises(ValueError, match="rate_at_boundary"):
    schedule_lib.create_learning_rate_fn(config)


def test_schedule_scales_with_global_batch():
  config = pretrain.get_config()
  config.batch_size = 4096  # 2x the reference: 2x LR, half the steps.
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  # Boundaries at half the steps: warm-up every 2,200 to 17,600, decays
  # after 55,000 and 110,000.
  steps = [0, 2_199, 2_200, 17_599, 17_600, 55_000, 55_001, 109_999, 110_000,
           110_001, 164_999]
  want = [2 * original_pretrain_lr(2 * s) for s in steps]
  # Doubling the step lands on the boundary from one side only: at 55,000
  # the original's step 110,000 (still 0.08), at 55,001 its 110,002.
  np.testing.assert_allclose([float(lr_fn(s)) for s in steps], want,
                             rtol=1e-6)
  assert schedule_lib.num_train_steps(config) == 220_000


def test_recipe_rates_are_unchanged():
  """The recipe schedule at chosen steps: the values of the code before
  named schedules (exact float32 lookups, so equal to the bit)."""
  cases = [
      (pretrain.get_config(), 2048,
       [0, 4_399, 4_400, 35_199, 35_200, 110_000, 110_001, 439_999],
       [0.009999999776482582, 0.009999999776482582, 0.012970000505447388,
        0.061741895973682404, 0.07999999821186066, 0.07999999821186066,
        0.00800000037997961, 7.999999797903001e-05]),
      (pretrain.get_config(), 4096,
       [0, 2_199, 2_200, 17_599, 17_600, 55_000, 55_001],
       [0.019999999552965164, 0.019999999552965164, 0.025940001010894775,
        0.12348379194736481, 0.1599999964237213, 0.1599999964237213,
        0.01600000075995922]),
      (finetune_imagenet.get_config(), 256,
       [0, 149_999, 150_000, 300_000, 450_000],
       [0.10000000149011612, 0.10000000149011612, 0.010000000707805157,
        0.0010000000474974513, 0.00010000000474974513])]
  for config, batch_size, steps, want in cases:
    config.batch_size = batch_size
    lr_fn = schedule_lib.create_learning_rate_fn(config)
    assert [float(lr_fn(s)) for s in steps] == want


def _named(name: str, **fields):
  """A schedule at twice its reference batch: 2x the rates, half the steps."""
  config = pretrain.get_config("smoke")
  defaults = config_lib.base_config().schedule
  config.schedule.update(dict(dict(
      name=name, reference_batch_size=16, base_lr=0.01, peak_lr=0.1,
      warmup_factor=defaults.warmup_factor,
      warmup_interval=defaults.warmup_interval, warmup_steps=20,
      decay_boundaries=()), **fields))
  config.batch_size = 32
  config.num_train_steps = 200
  config_validation.validate_config(config)  # No field of another name.
  return config


def test_warmup_cosine_matches_numpy():
  config = _named("warmup_cosine", end_lr=0.001)
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  steps = np.arange(0, 101)
  warmup, total = 10, 100  # 20 and 200 at the reference batch of 16.
  cosine = 0.5 * (1 + np.cos(np.pi * (steps - warmup) / (total - warmup)))
  want = 2 * np.where(steps < warmup,
                      0.01 + (0.1 - 0.01) * steps / warmup,
                      0.001 + (0.1 - 0.001) * cosine)
  np.testing.assert_allclose([float(lr_fn(s)) for s in steps], want,
                             rtol=1e-5)


def test_warmup_step_is_linear_then_the_recipes_decay():
  config = _named("warmup_step", decay_boundaries=(60, 120))
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  steps = np.arange(0, 100)
  # Boundaries 30 and 60 at the run's batch; a boundary keeps the old rate.
  want = 2 * np.where(steps < 10, 0.01 + (0.1 - 0.01) * steps / 10,
                      0.1 * 0.1 ** ((steps > 30).astype(int)
                                    + (steps > 60).astype(int)))
  np.testing.assert_allclose([float(lr_fn(s)) for s in steps], want,
                             rtol=1e-5)


def test_warmup_in_epochs_uses_train_examples_and_the_global_batch():
  config = _named("warmup_cosine", warmup_steps=0, warmup_epochs=2.5,
                  train_examples=128)
  assert schedule_lib.warmup_steps(config) == 10  # 2.5 x 128 / 32.
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  assert float(lr_fn(9)) == pytest.approx(2 * (0.01 + 0.09 * 0.9), rel=1e-5)
  assert float(lr_fn(10)) == pytest.approx(2 * 0.1, rel=1e-5)
