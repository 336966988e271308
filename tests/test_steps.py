"""Tests of mlimages_jax.train.steps: the pmapped train step on 8 CPU devices."""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.extend
import numpy as np
import pytest

from mlimages_jax.inputs import preprocessing
from mlimages_jax.train import distributed
from mlimages_jax.train import optimizer as optimizer_lib
from mlimages_jax.train import schedule as schedule_lib
from mlimages_jax.train import state as state_lib
from mlimages_jax.train import steps as steps_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402

NUM_CLASSES = 12
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def pmapped():
  """A tiny model's state replicated over the 8 CPU devices, one compile."""
  assert jax.local_device_count() == 8
  config = pretrain.get_config("smoke")
  config.schedule.base_lr = 0.05
  model = state_lib.create_model(config, NUM_CLASSES)
  lr_fn = schedule_lib.create_learning_rate_fn(config)
  tx = optimizer_lib.create_optimizer(config, lr_fn)
  state = state_lib.create_train_state(jax.random.PRNGKey(0), model, IMAGE_SIZE,
                                       tx)
  step = steps_lib.pmap_train_step(model,
                                   tx,
                                   config,
                                   optimizer_lib.batch_norm_modules(
                                       state.batch_stats),
                                   learning_rate_fn=lr_fn)
  rng = np.random.default_rng(1)
  batch = {
      "image": rng.integers(0, 256, (8, 2, IMAGE_SIZE, IMAGE_SIZE, 3),
                            dtype=np.uint8),
      "labels": (rng.random((8, 2, NUM_CLASSES)) < 0.3).astype(np.float32),
      "mask": np.ones((8, 2), np.float32)}
  return state, step, batch, lr_fn


@pytest.mark.slow
def test_pmapped_steps_reduce_loss_and_keep_devices_in_sync(pmapped):
  state, step, batch, lr_fn = pmapped
  replicated = distributed.replicate(state)
  losses = []
  for i in range(5):
    replicated, metrics = step(replicated, batch)
    host = distributed.unreplicate(metrics)
    assert host["finite"] == 1.0
    # The rate this step applied (the schedule at the pre-step count).
    assert host["learning_rate"] == pytest.approx(float(lr_fn(i)), rel=1e-6)
    losses.append(float(host["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  # Gradients and BN statistics are averaged: every device holds one state.
  for leaf in jax.tree.leaves(replicated):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    for shard in shards[1:]:
      np.testing.assert_array_equal(shard, shards[0])
  final = distributed.unreplicate(replicated)
  assert int(final.step) == 5
  # The adaptive loss counted the positive classes of the GLOBAL batch.
  positive = batch["labels"].reshape(-1, NUM_CLASSES).max(0) >= 0.7
  np.testing.assert_array_equal(final.loss_state.pos_count,
                                np.where(positive, 5.0, 0.0))


def test_unreplicated_state_survives_the_next_donating_steps(pmapped):
  """The loop copies the state for a checkpoint, then donates the device
  buffers to the next step before Orbax writes: the copy must not change."""
  state, step, batch, _ = pmapped
  replicated, _ = step(distributed.replicate(state), batch)
  saved = distributed.unreplicate(replicated)
  want = jax.tree.map(np.array, saved)  # Independent copies.
  for _ in range(2):
    replicated, _ = step(replicated, batch)
  after = distributed.unreplicate(replicated)
  assert int(saved.step) == 1 and int(after.step) == 3
  for got, expected in zip(jax.tree.leaves(saved), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, expected)
  assert not np.array_equal(saved.params["logits"]["kernel"],
                            after.params["logits"]["kernel"])


def test_non_finite_step_is_not_applied(pmapped):
  state, step, batch, _ = pmapped
  replicated = distributed.replicate(state)
  bad = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
  replicated, metrics = step(replicated, bad)
  host = distributed.unreplicate(metrics)
  assert host["finite"] == 0.0
  after = distributed.unreplicate(replicated)
  assert int(after.step) == 1
  for new, old in zip(jax.tree.leaves(after.params),
                      jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(new, old)
  with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 1"):
    steps_lib.check_finite([(1, host)], last_checkpoint=None)


def test_step_inputs_apply_the_colour_the_pipeline_drew():
  """Batches carrying `colour` are distorted on the device, others only
  normalised: the trainer must not silently drop the colour augmentation."""
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  colour = np.array([[1.0, 0.1, 1.4, 0.15, 0.7],
                     preprocessing.NEUTRAL_COLOUR], np.float32)
  plain = np.asarray(steps_lib.model_inputs({"image": image}))
  np.testing.assert_allclose(plain, np.asarray(preprocessing.normalize(image)))
  distorted = np.asarray(
      steps_lib.model_inputs({
          "image": image,
          "colour": colour
      }))
  np.testing.assert_allclose(
      distorted, np.asarray(preprocessing.device_augment(image, colour)),
      atol=1e-6)
  assert np.abs(distorted[0] - plain[0]).max() > 0.1
  np.testing.assert_allclose(distorted[1], plain[1], atol=1e-6)


def _pmapped_step(config, model, tx, bn_modules, num_devices, **kwargs):
  """`train_step` over the first `num_devices` CPU devices, on host trees."""
  step = jax.pmap(functools.partial(steps_lib.train_step, model=model, tx=tx,
                                    config=config, bn_modules=bn_modules,
                                    **kwargs),
                  axis_name=distributed.AXIS_NAME,
                  devices=jax.local_devices()[:num_devices])

  def run(state, batch):
    replicated = jax.tree.map(
        lambda x: np.stack([np.asarray(x)] * num_devices), state)
    sharded = jax.tree.map(
        lambda x: x.reshape(num_devices, -1, *x.shape[1:]), batch)
    return jax.tree.map(lambda x: np.asarray(x[0]),
                        step(replicated, sharded))

  return run


@pytest.mark.slow
def test_accumulated_micro_batches_equal_the_unaccumulated_step(subtests):
  """4 micro-batches of 2 on one device = one step of 2 per device on 4
  devices (per-device BN sees the same 2 images either way), step after
  step from the same state; the adaptive loss's coefficients are those of
  its positivity groups of 4, which span micro-batches, not of each
  micro-batch. (One group, the default, runs the same code: test_losses
  checks groups against it.) Both forms of accumulation, against the one
  plain step: the loop (accelerators) and unrolled (CPU)."""
  config = pretrain.get_config("smoke")
  config.schedule.base_lr = 0.005
  config.loss.positivity_batch_size = 4
  model = state_lib.create_model(config, NUM_CLASSES)
  tx = optimizer_lib.create_optimizer(
      config, schedule_lib.create_learning_rate_fn(config))
  state = state_lib.create_train_state(jax.random.PRNGKey(0), model,
                                       IMAGE_SIZE, tx)
  bn_modules = optimizer_lib.batch_norm_modules(state.batch_stats)
  plain_step = _pmapped_step(config, model, tx, bn_modules, 4)
  config = config.copy_and_resolve_references()
  config.accumulate_steps = 4
  for loop in (True, False):
    with subtests.test(loop_micro_batches=loop):
      _check_accumulation(
          state, plain_step,
          _pmapped_step(config, model, tx, bn_modules, 1,
                        loop_micro_batches=loop))


def _check_accumulation(state, plain_step, accumulated_step) -> None:
  """3 steps of both from the same states: the same counters, parameters
  within rounding, the same loss."""
  rng = np.random.default_rng(5)
  for _ in range(3):
    # Class k is positive in example k only: each micro-batch alone would
    # see other positive classes than its group does.
    labels = np.where(rng.random((8, NUM_CLASSES)) < 0.5, 0.0, -1.0)
    labels[np.arange(8), np.arange(8)] = 1.0
    batch = {
        "image": rng.integers(0, 256, (8, IMAGE_SIZE, IMAGE_SIZE, 3),
                              dtype=np.uint8),
        "labels": labels.astype(np.float32), "mask": np.ones(8, np.float32)}
    plain, plain_metrics = plain_step(state, batch)
    accumulated, metrics = accumulated_step(state, batch)
    assert plain_metrics["finite"] == metrics["finite"] == 1.0
    np.testing.assert_array_equal(accumulated.loss_state.pos_count,
                                  plain.loss_state.pos_count)
    np.testing.assert_array_equal(accumulated.loss_state.neg_count,
                                  plain.loss_state.neg_count)
    # Both average the same 4 per-device gradients, in another order (scan
    # vs all-reduce) and compiled apart: float32 rounding (2**-24 relative
    # per operation) through the network. Measured on parameters: at most
    # 3.6e-5 of a leaf's largest update, while coefficients taken per
    # micro-batch (positivity groups of 2) are off by 0.79 of it. 1e-3 sits
    # 28x above the one and 790x below the other.
    for got, want, start in zip(jax.tree.leaves(accumulated),
                                jax.tree.leaves(plain),
                                jax.tree.leaves(state)):
      update = np.abs(np.asarray(want, np.float64) - start).max()
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * update)
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"],
                               rtol=1e-5)
    state = plain
  # Group 1 (examples 4-7) came last: its classes 4-7 are positive in a run
  # of 1 group, those of group 0 were reset by it.
  assert state.loss_state.pos_count[:8].tolist() == [0.0] * 4 + [1.0] * 4


def _convolutions_in_loops(jaxpr, in_loop: bool = False) -> int:
  """How many convolutions of `jaxpr` run inside a scan or while loop."""
  count = 0
  for eqn in jaxpr.eqns:
    inside = in_loop or eqn.primitive.name in ("scan", "while")
    if eqn.primitive.name == "conv_general_dilated":
      count += inside
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _convolutions_in_loops(sub, inside)
  return count


def test_default_step_runs_the_network_outside_any_loop():
  """The default step (no accumulation) must be the network itself, not a
  loop around it: a one-trip scan made the demo's step 5x slower on CPU
  (XLA left its weight-gradient convolutions in a slow form)."""
  config = pretrain.get_config("smoke")
  model = state_lib.create_model(config, NUM_CLASSES)
  tx = optimizer_lib.create_optimizer(
      config, schedule_lib.create_learning_rate_fn(config))
  state = state_lib.create_train_state(jax.random.PRNGKey(0), model,
                                       IMAGE_SIZE, tx)
  batch = {"image": np.zeros((4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
           "labels": np.zeros((4, NUM_CLASSES), np.float32),
           "mask": np.ones(4, np.float32)}
  bn_modules = optimizer_lib.batch_norm_modules(state.batch_stats)

  def in_loops(accumulate_steps, **kwargs):
    config.accumulate_steps = accumulate_steps
    step = functools.partial(steps_lib.train_step, model=model, tx=tx,
                             config=config, bn_modules=bn_modules, **kwargs)
    jaxpr = jax.make_jaxpr(step, axis_env=[(distributed.AXIS_NAME, 1)])(
        state, batch).jaxpr
    return _convolutions_in_loops(jaxpr)

  assert in_loops(1) == 0
  # The check sees a loop where there is one: accumulation on accelerators
  # has its network in a loop; unrolled (CPU) it has none.
  assert in_loops(2) > 0
  assert in_loops(2, loop_micro_batches=False) == 0
