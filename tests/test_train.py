"""Tests of the training library: schedule, L2, pmapped steps, validation, NaN."""

from __future__ import annotations

import json
import pathlib
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlimages_jax.inputs import pipeline
from mlimages_jax.train import config as config_lib
from mlimages_jax.train import distributed
from mlimages_jax.train import loop
from mlimages_jax.train import optimizer as optimizer_lib
from mlimages_jax.train import run_log
from mlimages_jax.train import schedule as schedule_lib
from mlimages_jax.train import state as state_lib
from mlimages_jax.train import steps as steps_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402

NUM_CLASSES = 12
IMAGE_SIZE = 32


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


def _params_and_stats():
  config = pretrain.get_config("smoke")
  model = state_lib.create_model(config, NUM_CLASSES)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
                         train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      variables["params"])
  return params, variables["batch_stats"]


def test_weight_decay_excludes_batch_norm():
  params, batch_stats = _params_and_stats()
  bn_modules = optimizer_lib.batch_norm_modules(batch_stats)
  flat = flax.traverse_util.flatten_dict(params)
  bn_paths = [p for p in flat if "bn" in p[-2]]
  assert bn_paths and all(p[-1] in ("scale", "bias") for p in bn_paths)
  assert all(p[:-1] in bn_modules for p in bn_paths)
  want = 1e-4 * 0.5 * sum(float(np.sum(np.square(v, dtype=np.float64)))
                          for p, v in flat.items() if p not in bn_paths)
  got = float(optimizer_lib.weight_decay_penalty(params, bn_modules, 1e-4))
  assert got == pytest.approx(want, rel=1e-5)
  # The gradient of the penalty is wd * w off BN, exactly zero on BN.
  grads = flax.traverse_util.flatten_dict(
      jax.grad(lambda p: optimizer_lib.weight_decay_penalty(
          p, bn_modules, 1e-4))(params))
  for path, grad in grads.items():
    expected = 0.0 if path in bn_paths else 1e-4 * flat[path]
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-12)
  # The fine-tuning recipe's BN decay applies to exactly the BN parameters.
  bn_only = float(
      optimizer_lib.weight_decay_penalty(params, bn_modules, 0.0, 1e-5))
  want_bn = 1e-5 * 0.5 * sum(float(np.sum(np.square(flat[p], dtype=np.float64)))
                             for p in bn_paths)
  assert bn_only == pytest.approx(want_bn, rel=1e-5)


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


def test_unknown_field_is_rejected_with_a_suggestion():
  config = pretrain.get_config("smoke")
  config.unlock()
  config.model.dept = 50
  with pytest.raises(
      config_lib.ConfigError,
      match=r"unknown field "
      r"config\.model\.dept \(did you mean config\.model\.depth"):
    config_lib.validate_config(config)


def test_bad_types_loss_and_batch_are_rejected():
  config = pretrain.get_config("smoke")
  config.batch_size = 12  # Not divisible by 8 devices.
  config.loss.name = "softmax"  # Needs single labels.
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_config(config)
  assert "config.batch_size=12 is not divisible by the 8 devices" in str(e.value)
  assert "needs label_mode 'single'" in str(e.value)


def test_missing_dataset_fails_fast_with_build_command(tmp_path):
  config = pretrain.get_config()  # The full recipe: ml_images/full.
  config.data_dir = str(tmp_path)
  start = time.perf_counter()
  with pytest.raises(pipeline.DatasetNotBuiltError,
                     match=r"tfds build tfds_builder/ml_images --config=full"):
    loop.train_and_evaluate(config, tmp_path / "work")
  assert time.perf_counter() - start < 20
  assert not (tmp_path / "work" / "checkpoints").exists()


def test_metrics_log_truncates_on_resume(tmp_path):
  log = run_log.MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
  for step in (2, 4, 6):
    log.write({"step": step, "loss": 1.0 / step})
  log.write({"step": 6, "split": "validation", "mAP": 0.5})
  log.truncate_after(4)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
           .splitlines()]
  assert [l["step"] for l in lines] == [2, 4]


def test_step_inputs_apply_the_colour_the_pipeline_drew():
  """Batches carrying `colour` are distorted on the device, others only
  normalised: the trainer must not silently drop the colour augmentation."""
  from mlimages_jax.inputs import preprocessing
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
