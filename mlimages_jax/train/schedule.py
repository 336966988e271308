"""The learning-rate schedule and its batch-size scaling rule.

The schedule in the config is written for ``schedule.reference_batch_size``
images per step. For another global batch ``B`` the learning rates are
multiplied by ``B / reference`` (linear scaling, Goyal et al. 2017) and every
step count of the schedule (warm-up interval, warm-up end, decay boundaries,
``num_train_steps``, ``progressive_resizing.from_step``) by ``reference / B``,
so the run sees the same number of epochs with the same per-epoch LR profile.
"""

from __future__ import annotations

import ml_collections
import optax


def schedule_scale(config: ml_collections.ConfigDict) -> float:
  """Global batch / reference batch: the LR factor (and inverse step factor)."""
  return config.batch_size / config.schedule.reference_batch_size


def scaled_steps(steps: int, config: ml_collections.ConfigDict) -> int:
  """A step count of the schedule, converted to this run's global batch."""
  return max(1, round(steps / schedule_scale(config))) if steps else 0


def num_train_steps(config: ml_collections.ConfigDict) -> int:
  return scaled_steps(config.num_train_steps, config)


def create_learning_rate_fn(config: ml_collections.ConfigDict
                            ) -> optax.Schedule:
  """§7: staircase exponential warm-up, then step decay (batch-scaled).

  At the reference batch: ``base_lr * warmup_factor ** (step // interval)``
  until ``warmup_steps``, then ``peak_lr * decay_factor ** k`` after the k-th
  decay boundary. (The original: 0.01 x1.297 every 4,400 steps to 35,200, then
  0.08, x0.1 at 110k/220k/330k/440k.)
  """
  s = config.schedule
  scale = schedule_scale(config)
  warmup_steps = scaled_steps(s.warmup_steps, config)
  after_warmup = optax.piecewise_constant_schedule(
      s.peak_lr * scale,
      {scaled_steps(b, config) - warmup_steps: s.decay_factor
       for b in s.decay_boundaries})
  if not warmup_steps:
    return after_warmup
  warmup = optax.exponential_decay(s.base_lr * scale,
                                   transition_steps=scaled_steps(
                                       s.warmup_interval, config),
                                   decay_rate=s.warmup_factor,
                                   staircase=True)
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def image_size_at(config: ml_collections.ConfigDict, step: int) -> int:
  """Training image size of step number `step` (1-based, batch-scaled).

  With ``progressive_resizing.image_size`` set, the steps after
  ``from_step`` (a schedule step count, scaled like the others) use it.
  """
  resize = config.progressive_resizing
  if resize.image_size and step > scaled_steps(resize.from_step, config):
    return resize.image_size
  return config.image_size
