"""Tests of mlimages_jax.train.optimizer: L2 in the loss, BN excluded; the
named optimizers against NumPy references."""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlimages_jax.checkpoints import store
from mlimages_jax.train import finetune
from mlimages_jax.train import optimizer as optimizer_lib
from mlimages_jax.train import schedule as schedule_lib
from mlimages_jax.train import state as state_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402

NUM_CLASSES = 12
IMAGE_SIZE = 32


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


# A small tree: a 2-D kernel (decayed, trust-ratio scaled) and 1-D BN
# scale/offset and a bias (neither, for LARS/LAMB/AdamW).
TREE = {"conv": {"kernel": np.float32([[0.5, -1.0, 0.3], [2.0, 0.25, -0.7]])},
        "bn": {"scale": np.float32([1.0, 0.75, 1.2]),
               "bias": np.float32([0.1, -0.2, 0.05])},
        "head": {"bias": np.float32([0.4, -0.6, 0.9])}}


def _grads(k: int):
  """Step k's gradient: varied signs and norms, no leaf all zero."""
  return jax.tree.map(
      lambda p: np.float32(0.3) * p + np.float32(0.1 * k + 0.05), TREE)


def _config(name: str, **fields):
  config = pretrain.get_config("smoke")
  config.optimizer.name = name
  config.optimizer.update(fields)
  return config


def _run(config, steps: int, lr=0.1):
  """The params after `steps` updates of config's optimizer at rate `lr`."""
  tx = optimizer_lib.create_optimizer(config, lambda step: lr)
  state, params = tx.init(TREE), TREE
  for k in range(steps):
    updates, state = tx.update(_grads(k), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return jax.tree.map(np.asarray, params)


def test_default_sgd_updates_are_the_recipes():
  """The smoke recipe's SGD on its own schedule, three updates: the values
  the code before named optimizers gave (float.hex literals)."""
  config = pretrain.get_config("smoke")
  sgd_tree = {"conv": {"kernel": np.float32([[0.5, -1.0], [2.0, 0.25]])},
              "bn": {"scale": np.float32([1.0, 0.75]),
                     "bias": np.float32([0.1, -0.2])}}
  tx = optimizer_lib.create_optimizer(
      config, schedule_lib.create_learning_rate_fn(config))
  state, params = tx.init(sgd_tree), sgd_tree
  for k in range(3):
    grads = jax.tree.map(
        lambda p, k=k: np.float32(0.3) * p + np.float32(0.1 * k + 0.05),
        sgd_tree)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  want = {"bn": {"bias": ["0x1.7113d6p-4", "-0x1.a20992p-3"],
                 "scale": ["0x1.f21118p-1", "0x1.7487b4p-1"]},
          "conv": {"kernel": ["0x1.edfc9ep-2", "-0x1.fa3a0cp-1",
                              "0x1.f41b54p+0", "0x1.e5d3aap-3"]}}
  for path, values in flax.traverse_util.flatten_dict(want).items():
    got = np.ravel(flax.traverse_util.flatten_dict(params)[path])
    np.testing.assert_allclose(got, [float.fromhex(v) for v in values],
                               rtol=1e-6)


def test_lars_matches_numpy_with_bn_and_biases_excluded():
  """LARS (You et al. 2017, optax's order): decay and trust ratio on the
  kernels only, learning rate, then heavy-ball momentum."""
  wd, trust, momentum, lr = 1e-2, 1e-3, 0.9, 0.1
  got = _run(_config("lars", weight_decay=wd, trust_coefficient=trust,
                     momentum=momentum), 3, lr)
  flat = flax.traverse_util.flatten_dict(TREE)
  for path, w in flat.items():
    w, trace = w.astype(np.float64), 0.0
    for k in range(3):
      g = flax.traverse_util.flatten_dict(_grads(k))[path].astype(np.float64)
      if w.ndim > 1:
        g = g + wd * w
        g = g * trust * np.linalg.norm(w) / np.linalg.norm(g)
      trace = lr * g + momentum * trace
      w = w - trace
    np.testing.assert_allclose(
        flax.traverse_util.flatten_dict(got)[path], w, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_adamw_and_lamb_match_numpy_first_step(name):
  """One step: Adam's direction g/(|g|+eps), plus decoupled decay on the
  kernels only; LAMB scales each leaf by ||w|| / ||direction||."""
  wd, lr, eps = 0.05, 0.01, 1e-6  # lr: no cancellation in w - lr * step.
  got = flax.traverse_util.flatten_dict(
      _run(_config(name, weight_decay=wd, eps=eps), 1, lr))
  for path, w in flax.traverse_util.flatten_dict(TREE).items():
    w = w.astype(np.float64)
    g = flax.traverse_util.flatten_dict(_grads(0))[path].astype(np.float64)
    step = g / (np.abs(g) + eps) + (wd * w if w.ndim > 1 else 0.0)
    if name == "lamb":
      step = step * np.linalg.norm(w) / np.linalg.norm(step)
    np.testing.assert_allclose(got[path], w - lr * step, rtol=1e-5)


def test_gradient_clipping_by_global_norm():
  """First SGD step: the momentum trace is the clipped gradient."""
  norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                           for g in jax.tree.leaves(_grads(0)))))
  got = _run(_config("sgd", clip_global_norm=norm / 4), 1)
  want = jax.tree.map(lambda w, g: w - 0.1 * g / 4, TREE, _grads(0))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5),
               got, want)
  unclipped = _run(_config("sgd", clip_global_norm=norm * 2), 1)
  jax.tree.map(lambda w, g, u: np.testing.assert_allclose(
      u, w - 0.1 * g, rtol=1e-5), TREE, _grads(0), unclipped)


def test_only_sgd_adds_l2_to_the_loss():
  assert optimizer_lib.loss_weight_decay(
      _config("sgd", weight_decay_bn=1e-5).optimizer) == (1e-4, 1e-5)
  for name in ("lars", "lamb", "adamw"):
    assert optimizer_lib.loss_weight_decay(
        _config(name).optimizer) == (0.0, 0.0)


def test_frozen_blocks_stay_put_under_lars():
  """Fine-tuning's frozen stem and stages get zero updates whatever the
  optimizer (a tree named like the model's: stem, stage 0, stage 1)."""
  params = {"init_conv": TREE["conv"], "stages_0_block_0": TREE["bn"],
            "stages_1_block_0": TREE["conv"], "logits": TREE["head"]}
  config = _config("lars")
  config.freeze_blocks = 1
  tx = optimizer_lib.create_optimizer(config, lambda step: 0.1)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, update in flax.traverse_util.flatten_dict(updates).items():
    assert np.all(update != 0) != finetune.is_frozen(path, 1), path


def test_checkpoint_metadata_records_the_chosen_fields_only():
  config = _config("lars", trust_coefficient=0.02)
  record = optimizer_lib.optimization_record(config)
  assert record == {
      "optimizer": {"name": "lars", "clip_global_norm": 0.0,
                    "momentum": 0.9, "weight_decay": 1e-4,
                    "trust_coefficient": 0.02},
      "schedule": {"name": "recipe", "reference_batch_size": 16,
                   "base_lr": 0.01, "peak_lr": 0.08, "warmup_steps": 4,
                   "warmup_epochs": 0.0, "train_examples": 0,
                   "warmup_factor": 1.297, "warmup_interval": 2,
                   "decay_boundaries": [5], "decay_factor": 0.1,
                   "rate_at_boundary": "previous"},
      "batch_size": 16}
  metadata = store.make_metadata(
      depth=14, num_classes=1, width_multiplier=0.25, image_size=32,
      label_mode="multi", class_ids=["n0"], class_names=["zero"],
      optimization=record)
  assert json.loads(json.dumps(metadata))["optimization"] == record
  with pytest.raises(store.CheckpointError, match="'optimization' must be"):
    store.validate_metadata(dict(metadata, optimization="lars"))
