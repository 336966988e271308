"""Tests of mlimages_jax.train.optimizer: L2 in the loss, BN excluded."""

from __future__ import annotations

import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlimages_jax.train import optimizer as optimizer_lib
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
