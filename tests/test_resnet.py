"""Tests for mlimages_jax.models.resnet against §6 of ML_IMAGES.md."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlimages_jax.models import resnet


def _abstract_variables(model: resnet.ResNet, image_size: int = 224):
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
      train=False))


def _count(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def _reference_param_count(stage_sizes, num_classes: int) -> int:
  """Trainable parameters of the §6 network, by arithmetic on the layer list."""
  total = 7 * 7 * 3 * 64  # Stem conv, no bias, no BN.
  channels = 64
  for blocks, out in zip(stage_sizes, (256, 512, 1024, 2048)):
    mid = out // 4
    for j in range(blocks):
      if j == 0:  # Projection shortcut: BN(gamma, beta) + 1x1 conv.
        total += 2 * channels + channels * out
      total += 2 * channels + channels * mid  # BN + conv1x1.
      total += 2 * mid + 3 * 3 * mid * mid  # BN + conv3x3.
      total += 2 * mid + mid * out  # BN + conv1x1.
      channels = out
  total += 2 * channels  # Final BN.
  total += channels * num_classes + num_classes  # Dense with bias.
  return total


def test_resnet101_mlimages_parameter_count():
  model = resnet.create_model(101, 11166)
  variables = _abstract_variables(model)
  expected = _reference_param_count((3, 4, 23, 3), 11166)
  assert expected == 65_375_326
  assert _count(variables["params"]) == expected
  # Moving mean and variance for every BN: 2 per BN channel.
  bn_params = sum(_count(v) for k, v in _flatten_modules(variables["params"])
                  if k.endswith("_bn"))
  assert _count(variables["batch_stats"]) == bn_params
  leaves = jax.tree_util.tree_leaves(variables)
  assert all(a.dtype == jnp.float32 for a in leaves)


def _flatten_modules(tree, prefix=""):
  for name, value in tree.items():
    path = f"{prefix}/{name}" if prefix else name
    if all(isinstance(v, dict) for v in value.values()):
      yield from _flatten_modules(value, path)
    else:
      yield path, value


def test_variable_names_mirror_tf_scopes():
  variables = _abstract_variables(resnet.create_model(50, 1000))
  params, stats = variables["params"], variables["batch_stats"]
  assert params["init_conv"]["kernel"].shape == (7, 7, 3, 64)
  assert set(params) == (
      {"init_conv", "global_pool_bn", "logits"}
      | {f"stages_{i}_block_{j}" for i, n in enumerate((3, 4, 6, 3))
         for j in range(n)})
  first = params["stages_1_block_0"]
  assert set(first) == {"conv1_b1", "conv1_b1_bn", "conv1_b2_bn", "conv1_b2",
                        "conv2_b2_bn", "conv2_b2", "conv3_b2_bn", "conv3_b2"}
  assert first["conv1_b1"]["kernel"].shape == (1, 1, 256, 512)
  assert first["conv2_b2"]["kernel"].shape == (3, 3, 128, 128)
  assert "conv1_b1" not in params["stages_1_block_1"]
  assert set(stats["stages_2_block_3"]["conv2_b2_bn"]) == {"mean", "var"}
  assert params["logits"]["kernel"].shape == (2048, 1000)
  assert params["logits"]["bias"].shape == (1000,)


@pytest.mark.parametrize("depth,blocks", [(50, (3, 4, 6, 3)),
                                          (101, (3, 4, 23, 3)),
                                          (152, (3, 8, 36, 3))])
def test_output_shapes(depth, blocks):
  model = resnet.create_model(depth, 11166)
  assert tuple(model.stage_sizes) == blocks
  variables = _abstract_variables(model)
  logits, features = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), variables,
      jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert logits.shape == (2, 11166) and logits.dtype == jnp.float32
  assert features.shape == (2, 2048)
  assert _count(variables["params"]) == _reference_param_count(blocks, 11166)


def test_every_stage_halves_the_resolution():
  # Stem stride 2 and stride 2 in the first block of every stage (no
  # max-pool): output sizes are ceil(size / 2) at each of the 5 steps.
  model = resnet.create_model(14, 5, width_multiplier=0.0625)
  variables = _abstract_variables(model, 64)
  for size in (64, 65, 95):
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                 mutable=["intermediates"]), variables,
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    inter = state["intermediates"]
    names = ["init_conv"] + [f"stages_{i}_block_0" for i in range(4)]
    expected = size
    for name in names:
      expected = -(-expected // 2)
      assert inter[name]["__call__"][0].shape[1:3] == (expected, expected)


def _reference_conv(x, kernel, stride):
  """The original's conv: explicit (k-1)//2 / rest pre-padding + VALID."""
  k = kernel.shape[0]
  if stride > 1:
    before = (k - 1) // 2
    x = jnp.pad(x, ((0, 0), (before, k - 1 - before),
                    (before, k - 1 - before), (0, 0)))
    padding = "VALID"
  else:
    padding = "SAME"
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def _reference_bn(x, bn_params, bn_stats, eps=1e-5):
  return ((x - bn_stats["mean"]) / jnp.sqrt(bn_stats["var"] + eps)
          * bn_params["scale"] + bn_params["bias"])


def _reference_forward(variables, x, stage_sizes):
  """§6 written out with lax primitives, used to check the Flax module."""
  params, stats = variables["params"], variables["batch_stats"]

  def bn_relu(scope, name, y):
    return jax.nn.relu(_reference_bn(y, params[scope][name],
                                     stats[scope][name]))

  y = _reference_conv(x, params["init_conv"]["kernel"], 2)
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      scope = f"stages_{i}_block_{j}"
      p = params[scope]
      stride = 2 if j == 0 else 1
      shortcut = y
      if j == 0:
        shortcut = _reference_conv(bn_relu(scope, "conv1_b1_bn", y),
                                   p["conv1_b1"]["kernel"], stride)
      r = _reference_conv(bn_relu(scope, "conv1_b2_bn", y),
                          p["conv1_b2"]["kernel"], 1)
      r = _reference_conv(bn_relu(scope, "conv2_b2_bn", r),
                          p["conv2_b2"]["kernel"], stride)
      r = _reference_conv(bn_relu(scope, "conv3_b2_bn", r),
                          p["conv3_b2"]["kernel"], 1)
      y = r + shortcut
  y = jax.nn.relu(_reference_bn(y, params["global_pool_bn"],
                                stats["global_pool_bn"]))
  feature = y.mean(axis=(1, 2))
  logits = feature @ params["logits"]["kernel"] + params["logits"]["bias"]
  return logits, feature


def _random_variables(model, x, seed=1):
  """Random weights and non-trivial BN statistics for `model`, drawn in NumPy
  from the abstract shapes (a real init would cost one more XLA compile)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      value = rng.normal(0.0, np.sqrt(1.0 / fan_in), leaf.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # BN bias, BN mean, dense bias.
      value = rng.normal(0.0, 0.3, leaf.shape)
    return jnp.asarray(value, jnp.float32)

  abstract = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.PRNGKey(0), x)
  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny():
  model = resnet.create_model(26, 7, width_multiplier=0.125)
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, 37, 37, 3),
                         minval=-1.0, maxval=1.0)
  return model, _random_variables(model, x), x


def _first_blocks_only(tree):
  return {k: v for k, v in tree.items() if not k.endswith("_block_1")}


@pytest.fixture(scope="module")
def tiny14(tiny):
  """ResNet-14 variables: the ResNet-26 ones without the second blocks."""
  _, variables, x = tiny
  variables = {name: _first_blocks_only(tree)
               for name, tree in variables.items()}
  return resnet.create_model(14, 7, width_multiplier=0.125), variables, x


def test_tiny_forward_matches_lax_reference(tiny):
  model, variables, x = tiny
  with jax.default_matmul_precision("highest"):
    logits, features = jax.jit(functools.partial(model.apply, train=False))(
        variables, x)
    ref_logits, ref_features = jax.jit(functools.partial(
        _reference_forward, stage_sizes=(2, 2, 2, 2)))(variables, x)
  assert logits.shape == (2, 7) and features.shape == (2, 256)
  np.testing.assert_allclose(features, ref_features, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_explicit_padding_differs_from_same_on_even_inputs():
  # The reason for the explicit padding: XLA's SAME pads (2, 3) for a 7x7/2
  # conv on an even input; the original pads (3, 3).
  assert resnet.explicit_padding(7) == (3, 3)
  assert resnet.explicit_padding(3) == (1, 1)
  assert resnet.explicit_padding(1) == (0, 0)
  conv = resnet.make_conv(4, 7, 2, name="c")
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
  variables = conv.init(jax.random.PRNGKey(1), x)
  kernel = variables["params"]["kernel"]
  ours = conv.apply(variables, x)
  np.testing.assert_allclose(ours, _reference_conv(x, kernel, 2), rtol=1e-5,
                             atol=1e-5)
  same = jax.lax.conv_general_dilated(
      x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert not np.allclose(ours, same, atol=1e-3)


def test_train_mode_updates_batch_stats_with_momentum(tiny14):
  model, variables, x = tiny14
  _, state = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=True))(variables, x)
  old = variables["batch_stats"]["global_pool_bn"]
  new = state["batch_stats"]["global_pool_bn"]
  # The final BN's input is the last block's output.
  block_out = state["intermediates"]["stages_3_block_0"]["__call__"][0]
  batch_mean = block_out.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(
      new["mean"], 0.997 * old["mean"] + 0.003 * batch_mean, rtol=1e-5,
      atol=1e-6)


def test_bfloat16_compute_float32_params(tiny14):
  model, variables, x = tiny14
  bf16 = resnet.create_model(14, 7, width_multiplier=0.125,
                             dtype=jnp.bfloat16)
  init = jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), x,
                                          train=False))
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(init))
  logits, features = jax.jit(functools.partial(bf16.apply, train=False))(
      variables, x)
  _, ref_features = jax.jit(functools.partial(model.apply, train=False))(
      variables, x)
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  scale = np.abs(ref_features).max()
  np.testing.assert_allclose(features, ref_features, atol=0.05 * scale)
  # bf16 really ran: results are close to, but not bit-equal with, float32.
  assert not np.array_equal(features, ref_features)

  def loss(params):
    (logits, _), _ = bf16.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    return logits.sum()

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g))
             for g in jax.tree_util.tree_leaves(grads))


def test_bad_arguments():
  with pytest.raises(ValueError, match="unsupported ResNet depth 34"):
    resnet.create_model(34, 10)
  with pytest.raises(ValueError, match="num_classes"):
    resnet.create_model(50, 0)
  assert resnet.depth_of((3, 4, 23, 3)) == 101
  with pytest.raises(ValueError, match="no supported depth"):
    resnet.depth_of((1, 2, 3, 4))


def test_sync_batch_norm_matches_global_batch(tiny14):
  """bn_axis_name: per-device batches normalised with global-batch moments."""
  _, variables, _ = tiny14
  x = jax.random.uniform(jax.random.PRNGKey(5), (8, 2, 32, 32, 3),
                         minval=-1.0, maxval=1.0)
  synced = resnet.create_model(14, 7, width_multiplier=0.125,
                               bn_axis_name="batch")
  local = resnet.create_model(14, 7, width_multiplier=0.125)

  def step(model, v, images):
    return model.apply(v, images, train=True, mutable=["batch_stats"])

  (logits, _), state = jax.pmap(functools.partial(step, synced),
                                axis_name="batch", in_axes=(None, 0))(
                                    variables, x)
  (ref_logits, _), ref_state = jax.jit(functools.partial(step, local))(
      variables, x.reshape(16, 32, 32, 3))
  np.testing.assert_allclose(logits.reshape(16, 7), ref_logits, rtol=1e-4,
                             atol=1e-4)
  for ours, ref in zip(jax.tree_util.tree_leaves(state),
                       jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_allclose(ours[0], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[7], ours[0])
