"""The learning-rate schedule and its batch-size scaling rule.

The schedule in the config is written for ``schedule.reference_batch_size``
images per step. For another global batch ``B`` the learning rates are
multiplied by ``B / reference`` (linear scaling, Goyal et al. 2017) and every
step count of the schedule (warm-up interval, warm-up end, decay boundaries,
``num_train_steps``, ``progressive_resizing.from_step``) by ``reference / B``,
so the run sees the same number of epochs with the same per-epoch LR profile.

``schedule.name`` picks the shape (`FIELDS` lists the fields each reads):
``recipe`` (the original's staircase exponential warm-up, then step decay),
``warmup_cosine`` (linear warm-up from ``base_lr`` to ``peak_lr``, then
cosine decay to ``end_lr`` at the last step) and ``warmup_step`` (the same
linear warm-up, then the recipe's step decay). The warm-up is
``warmup_steps`` schedule steps (scaled like the others) or, when
``warmup_epochs`` > 0, that many epochs of ``train_examples`` images at the
run's global batch (the config does not otherwise know the dataset's size).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# `schedule.rate_at_boundary`: the rate of the step equal to a decay boundary.
# "previous" is TF's tf.train.piecewise_constant (x <= boundary keeps the old
# value), the original's pre-training (train.py); "decayed" is TF's
# tf.train.exponential_decay(staircase=True) (floor(step / interval)), the
# original's fine-tuning (finetune.py).
RATES_AT_BOUNDARY = ("previous", "decayed")
# schedule.name -> the fields of config.schedule it reads, besides
# COMMON_FIELDS (read by all).
_WARMUP = ("warmup_steps", "warmup_epochs", "train_examples")
_STEP_DECAY = ("decay_boundaries", "decay_factor", "rate_at_boundary")
FIELDS = {
    "recipe": (*_WARMUP, "warmup_factor", "warmup_interval", *_STEP_DECAY),
    "warmup_cosine": (*_WARMUP, "end_lr"),
    "warmup_step": (*_WARMUP, *_STEP_DECAY),
}
COMMON_FIELDS = ("name", "reference_batch_size", "base_lr", "peak_lr")


def schedule_scale(config: ml_collections.ConfigDict) -> float:
  """Global batch / reference batch: the LR factor (and inverse step factor)."""
  return config.batch_size / config.schedule.reference_batch_size


def scaled_steps(steps: int, config: ml_collections.ConfigDict) -> int:
  """A step count of the schedule, converted to this run's global batch."""
  return max(1, round(steps / schedule_scale(config))) if steps else 0


def num_train_steps(config: ml_collections.ConfigDict) -> int:
  return scaled_steps(config.num_train_steps, config)


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  """The warm-up's length in this run's steps: ``warmup_epochs`` epochs of
  ``train_examples`` at the global batch, else ``warmup_steps`` scaled."""
  s = config.schedule
  if s.warmup_epochs:
    return max(1, round(s.warmup_epochs * s.train_examples
                        / config.batch_size))
  return scaled_steps(s.warmup_steps, config)


def _tf_staircase_rate(initial: float, factor: float,
                       exponent: int) -> np.float32:
  """``initial * factor ** exponent`` in float32 as TF's exponential_decay
  computes it: the power rounded to float32, then the product rounded."""
  power = np.float32(np.float64(np.float32(factor)) ** exponent)
  return np.float32(initial) * power


def _step_decay(config: ml_collections.ConfigDict) -> optax.Schedule:
  """``peak_lr * decay_factor ** k`` (batch-scaled), k the decay boundaries
  passed; a boundary step counts as passed by ``rate_at_boundary``."""
  s = config.schedule
  if s.rate_at_boundary not in RATES_AT_BOUNDARY:
    raise ValueError(f"schedule.rate_at_boundary {s.rate_at_boundary!r} is "
                     f"not one of {RATES_AT_BOUNDARY}")
  boundaries = np.array([scaled_steps(b, config) for b in s.decay_boundaries],
                        np.int32)
  peak = s.peak_lr * schedule_scale(config)
  if s.rate_at_boundary == "previous":  # Python floats, as TF's `values`.
    rates = np.float32([peak * s.decay_factor ** k
                        for k in range(len(boundaries) + 1)])
  else:
    rates = np.float32([_tf_staircase_rate(peak, s.decay_factor, k)
                        for k in range(len(boundaries) + 1)])

  def decay(step):
    passed = (step > boundaries if s.rate_at_boundary == "previous"
              else step >= boundaries)
    return jnp.asarray(rates)[jnp.sum(passed)]

  return decay


def _staircase_warmup(config: ml_collections.ConfigDict,
                      length: int) -> optax.Schedule:
  """``base_lr * warmup_factor ** (step // warmup_interval)`` (scaled)."""
  s = config.schedule
  scale = schedule_scale(config)
  interval = scaled_steps(s.warmup_interval, config)
  rates = np.float32([
      _tf_staircase_rate(s.base_lr * scale, s.warmup_factor, j)
      for j in range(-(-length // interval))])
  return lambda step: jnp.asarray(rates)[
      jnp.minimum(step // interval, len(rates) - 1)]


def create_learning_rate_fn(config: ml_collections.ConfigDict
                            ) -> optax.Schedule:
  """The learning rate of each step (batch-scaled), by ``schedule.name``.

  `step` is the number of updates already applied (optax's count; TF's
  global_step, which apply_gradients increments after the update): the
  first update is step 0.

  ``recipe`` (§7/§8), at the reference batch: ``base_lr * warmup_factor **
  (step // interval)`` while ``step < warmup_steps``, then ``peak_lr *
  decay_factor ** k`` with k the decay boundaries passed, a boundary step
  itself counting as passed or not by ``rate_at_boundary``
  (`RATES_AT_BOUNDARY`). The rates are TF's float32 values, so the
  original's schedules are reproduced exactly: pre-training 0.01 x1.297
  every 4,400 steps to 35,200, then 0.08, x0.1 after 110k/220k/330k/440k
  ("previous"); fine-tuning 0.1 x0.1 from 150k/300k/450k on ("decayed").

  ``warmup_cosine``: optax's linear warm-up from ``base_lr`` to ``peak_lr``
  then cosine decay to ``end_lr`` at ``num_train_steps``. ``warmup_step``:
  the same linear warm-up, then the recipe's step decay.
  """
  s = config.schedule
  if s.name not in FIELDS:
    raise ValueError(f"schedule.name {s.name!r} is not one of "
                     f"{sorted(FIELDS)}")
  scale = schedule_scale(config)
  length = warmup_steps(config)
  if s.name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=s.base_lr * scale, peak_value=s.peak_lr * scale,
        warmup_steps=length, decay_steps=num_train_steps(config),
        end_value=s.end_lr * scale)
  decay = _step_decay(config)
  if not length:
    return lambda step: decay(jnp.asarray(step, jnp.int32))
  warmup = (_staircase_warmup(config, length) if s.name == "recipe" else
            optax.linear_schedule(s.base_lr * scale, s.peak_lr * scale,
                                  length))

  def learning_rate(step):
    step = jnp.asarray(step, jnp.int32)
    return jnp.where(step < length, warmup(step), decay(step))

  return learning_rate


def image_size_at(config: ml_collections.ConfigDict, step: int) -> int:
  """Training image size of step number `step` (1-based, batch-scaled).

  With ``progressive_resizing.image_size`` set, the steps after
  ``from_step`` (a schedule step count, scaled like the others) use it.
  """
  resize = config.progressive_resizing
  if resize.image_size and step > scaled_steps(resize.from_step, config):
    return resize.image_size
  return config.image_size
