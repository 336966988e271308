"""Tests of mlimages_jax.train.steps: the pmapped train step on 8 CPU devices."""

from __future__ import annotations

import pathlib
import sys

import jax
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
