"""Tests for mlimages_jax.losses against a NumPy transcription of §7."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlimages_jax.train import losses


class NumpyAdaptiveLoss:
  """§7 written out with NumPy loops, one class and one example at a time."""

  def __init__(self, num_classes, pos_weight=12.0, mask_thres=0.7,
               neg_select=0.1):
    self.pos_count = np.zeros(num_classes, np.float64)
    self.neg_count = np.zeros(num_classes, np.float64)
    self.pos_weight = pos_weight
    self.mask_thres = mask_thres
    self.neg_select = neg_select

  def step(self, logits, labels, draws):
    batch, num_classes = labels.shape
    loss = 0.0
    coefs = np.zeros(num_classes)
    for c in range(num_classes):
      positive = any(labels[n, c] >= self.mask_thres for n in range(batch))
      sampled = draws[c] <= self.neg_select
      if positive:
        self.pos_count[c] += 1
        self.neg_count[c] = 0
        coef = max(-np.log10((0.01 + self.pos_count[c]) / 10), 0.01)
      else:
        self.pos_count[c] = 0
        if sampled:
          self.neg_count[c] += 1
          coef = -np.log10((8 + self.neg_count[c]) / 10)
          coef = coef if coef > 0.01 else 0.001
        else:
          coef = 0.0
      coefs[c] = coef
      total = 0.0
      for n in range(batch):
        y, z = float(labels[n, c]), float(logits[n, c])
        if y == -1:
          continue
        total += (self.pos_weight * y * np.log1p(np.exp(-z))
                  + (1 - y) * np.log1p(np.exp(z)))
      loss += coef * total / batch  # Mean over the whole batch (reduce_mean).
    return loss, coefs


def _random_batch(rng, batch, num_classes, positive_rate=0.15,
                  ignore_rate=0.1):
  """Labels like the annotation files: sparse positives with confidences
  (some below the 0.7 positivity threshold), zeros, and -1 entries."""
  labels = np.zeros((batch, num_classes), np.float32)
  hits = rng.random((batch, num_classes)) < positive_rate
  labels[hits] = rng.choice([1.0, 0.9, 0.8, 0.6, 0.5], size=hits.sum())
  labels[rng.random((batch, num_classes)) < ignore_rate] = -1.0
  logits = rng.normal(0, 3, (batch, num_classes)).astype(np.float32)
  return logits, labels


def _draws(key, num_classes):
  return np.asarray(jax.random.uniform(key, (num_classes,), jnp.float32))


def test_matches_numpy_transcription_over_steps():
  num_classes, batch, steps = 40, 6, 30
  rng = np.random.default_rng(0)
  reference = NumpyAdaptiveLoss(num_classes, neg_select=0.3)
  state = losses.init_loss_state(num_classes)
  loss_fn = jax.jit(functools.partial(losses.adaptive_sigmoid_loss,
                                      neg_select=0.3))
  # Classes 0-4 always positive, 5-9 never: long runs of both counters, so
  # the coefficients cross their clipping thresholds (0.01 / 0.001).
  for step in range(steps):
    logits, labels = _random_batch(rng, batch, num_classes)
    labels[0, :5] = 1.0
    labels[:, 5:10] = np.where(labels[:, 5:10] == -1, -1, 0)
    key = jax.random.PRNGKey(step)
    loss, state = loss_fn(logits, labels, state, key)
    ref_loss, _ = reference.step(logits, labels,
                                 _draws(key, num_classes))
    np.testing.assert_allclose(state.pos_count, reference.pos_count)
    np.testing.assert_allclose(state.neg_count, reference.neg_count)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  assert reference.pos_count[:5].tolist() == [steps] * 5
  assert reference.neg_count[5:10].max() >= 3  # Sampled negatives counted.
  assert state.pos_count.dtype == jnp.float32


def test_coefficients_hit_their_floors():
  positive = jnp.array([1, 1, 0, 0, 0], jnp.float32)
  selected = jnp.array([0, 0, 1, 1, 0], jnp.float32)
  state = losses.LossState(
      pos_count=jnp.array([0, 1000, 0, 0, 0], jnp.float32),
      neg_count=jnp.array([5, 0, 0, 1, 7], jnp.float32))
  coef, new = losses.class_coefficients(positive, selected, state)
  np.testing.assert_allclose(new.pos_count, [1, 1001, 0, 0, 0])
  np.testing.assert_allclose(new.neg_count, [0, 0, 1, 2, 7])
  np.testing.assert_allclose(
      coef, [-np.log10(1.01 / 10), 0.01, -np.log10(9 / 10), 0.001, 0.0],
      rtol=1e-6)


def test_ignored_entries_do_not_contribute():
  rng = np.random.default_rng(1)
  logits, labels = _random_batch(rng, 4, 12, ignore_rate=0.0)
  labels[0, :] = 1.0  # Every class positive: all coefficients equal.
  state = losses.init_loss_state(12)
  key = jax.random.PRNGKey(0)
  loss, _ = losses.adaptive_sigmoid_loss(logits, labels, state, key)
  masked_labels = labels.copy()
  masked_labels[1:, 3] = -1.0
  changed_logits = logits.copy()
  changed_logits[1:, 3] = 1e4  # Would dominate the loss if not masked.
  masked, _ = losses.adaptive_sigmoid_loss(changed_logits, masked_labels,
                                           state, key)
  ce = np.asarray(losses.weighted_sigmoid_cross_entropy(logits, labels, 12.0))
  coef = -np.log10(1.01 / 10)
  # Masked entries vanish but the batch size stays 4 (the original's mean).
  np.testing.assert_allclose(masked, loss - coef * ce[1:, 3].sum() / 4,
                             rtol=1e-5)
  grads = jax.grad(lambda z: losses.adaptive_sigmoid_loss(
      z, masked_labels, state, key)[0])(changed_logits)
  assert np.all(np.isfinite(grads))
  assert np.all(grads[1:, 3] == 0)


def test_gradient_finite_for_extreme_logits():
  logits = jnp.array([[-1e4, 1e4, 80.0, -80.0]], jnp.float32)
  labels = jnp.array([[1.0, 0.0, 0.0, 1.0]], jnp.float32)
  state = losses.init_loss_state(4)
  loss, grads = jax.value_and_grad(lambda z: losses.adaptive_sigmoid_loss(
      z, labels, state, jax.random.PRNGKey(0), neg_select=1.0)[0])(logits)
  assert np.isfinite(loss) and np.all(np.isfinite(grads))
  # Positive classes 0 and 3, softplus(1e4) ~ 1e4.
  assert loss > 1e4
  # bf16 logits are accepted and computed in float32.
  loss16, _ = losses.adaptive_sigmoid_loss(
      logits.astype(jnp.bfloat16), labels, state, jax.random.PRNGKey(0),
      neg_select=1.0)
  assert loss16.dtype == jnp.float32


def test_pmap_equals_single_device_on_global_batch():
  devices = jax.local_devices()
  assert len(devices) == 8, "conftest sets 8 host devices"
  num_classes, per_device, steps = 24, 3, 5
  rng = np.random.default_rng(2)
  single_fn = jax.jit(losses.adaptive_sigmoid_loss)

  def device_step(logits, labels, state, key):
    (loss, new_state), grads = jax.value_and_grad(
        losses.adaptive_sigmoid_loss, has_aux=True)(
            logits, labels, state, key, axis_name="batch")
    return jax.lax.pmean(loss, "batch"), new_state, grads

  pmapped = jax.pmap(device_step, axis_name="batch")
  single_state = losses.init_loss_state(num_classes)
  replicated = jax.tree.map(lambda a: np.stack([a] * 8), single_state)
  for step in range(steps):
    # Positives sit on few devices: positivity must be global to match.
    logits, labels = _random_batch(rng, 8 * per_device, num_classes,
                                   positive_rate=0.02)
    key = jax.random.PRNGKey(100 + step)
    # Device 0 gets the single run's key; the others get different keys,
    # and their draws must not matter.
    keys = jnp.stack([key] + [jax.random.PRNGKey(1000 * step + d)
                              for d in range(1, 8)])
    loss, replicated, grads = pmapped(
        logits.reshape(8, per_device, num_classes),
        labels.reshape(8, per_device, num_classes), replicated, keys)
    (single_loss, single_state), single_grads = jax.value_and_grad(
        single_fn, has_aux=True)(logits, labels, single_state, key)
    np.testing.assert_allclose(loss, np.full(8, single_loss), rtol=1e-5)
    for d in range(8):
      np.testing.assert_array_equal(replicated.pos_count[d],
                                    single_state.pos_count)
      np.testing.assert_array_equal(replicated.neg_count[d],
                                    single_state.neg_count)
    # Each device's gradient is 8x its share: pmean gives the global one.
    np.testing.assert_allclose(
        np.asarray(grads).reshape(-1, num_classes) / 8, single_grads,
        rtol=1e-5, atol=1e-8)
  assert single_state.neg_count.max() > 0


def test_plain_cross_entropies():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (5, 7)).astype(np.float32)
  labels = (rng.random((5, 7)) < 0.3).astype(np.float32)
  labels[0, 0] = -1.0
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  ce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  ce[0, 0] = 0.0
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(logits, labels),
                             ce.sum(axis=1).mean(), rtol=1e-5)
  int_labels = np.array([0, 6, 3, 3, 1])
  z = logits.astype(np.float64)
  log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(logits, int_labels, 7),
      -log_probs[np.arange(5), int_labels].mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="expected 8"):
    losses.softmax_cross_entropy(logits, int_labels, 8)


def test_shape_errors():
  state = losses.init_loss_state(3)
  with pytest.raises(ValueError, match="4 classes|3 classes"):
    losses.adaptive_sigmoid_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), state,
                                 jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="batch, num_classes"):
    losses.adaptive_sigmoid_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), state,
                                 jax.random.PRNGKey(0))


def _reference_grouped_step(reference, logits, labels, draws, group_size):
  """The original's per-batch update on each group in turn: the groups'
  mean loss and its gradient in the logits (float64, closed form)."""
  num_groups = len(labels) // group_size
  losses_, grads = [], np.zeros(labels.shape)
  for g in range(num_groups):
    rows = slice(g * group_size, (g + 1) * group_size)
    loss, coefs = reference.step(logits[rows], labels[rows], draws[g])
    losses_.append(loss)
    z, y = logits[rows].astype(np.float64), labels[rows].astype(np.float64)
    sigmoid = 1 / (1 + np.exp(-z))
    dce = reference.pos_weight * y * (sigmoid - 1) + (1 - y) * sigmoid
    dce[y == -1] = 0.0
    grads[rows] = coefs * dce / group_size / num_groups
  return np.mean(losses_), grads


@pytest.mark.parametrize("num_devices", [1, 4])
@pytest.mark.parametrize("group_size", [3, 4, 12, 0])
def test_positivity_groups_match_the_original_step_by_step(num_devices,
                                                           group_size):
  """Groups of 3 split each device's 6 examples, groups of 4 and 12 span
  devices, 0 is the whole batch: the counters must be exactly those of
  consecutive original steps, the loss and gradient theirs to float32."""
  num_classes, batch, steps = 16, 24, 4
  size = group_size or batch
  rng = np.random.default_rng(4)
  reference = NumpyAdaptiveLoss(num_classes, neg_select=0.4)
  devices = jax.local_devices()[:num_devices]

  def device_step(logits, labels, state, key):
    (loss, new_state), grads = jax.value_and_grad(
        losses.adaptive_sigmoid_loss, has_aux=True)(
            logits, labels, state, key, neg_select=0.4,
            group_size=group_size, axis_name="batch")
    return jax.lax.pmean(loss, "batch"), new_state, grads

  pmapped = jax.pmap(device_step, axis_name="batch", devices=devices)
  state = jax.tree.map(lambda a: np.stack([a] * num_devices),
                       losses.init_loss_state(num_classes))
  for step in range(steps):
    # Rare positives: the groups disagree on which classes are positive.
    logits, labels = _random_batch(rng, batch, num_classes,
                                   positive_rate=0.06)
    labels[::5, 0] = 1.0  # Class 0 positive in every group of >= 5 only.
    labels[:, 1] = 0.9  # Class 1 in every group: counted once per group.
    key = jax.random.PRNGKey(7 + step)
    keys = jnp.stack([key] + [jax.random.PRNGKey(500 + d)
                              for d in range(1, num_devices)])
    loss, state, grads = pmapped(
        logits.reshape(num_devices, -1, num_classes),
        labels.reshape(num_devices, -1, num_classes), state, keys)
    draws = np.asarray(jax.random.uniform(key, (batch // size, num_classes)))
    ref_loss, ref_grads = _reference_grouped_step(reference, logits, labels,
                                                  draws, size)
    for d in range(num_devices):  # Counts are small integers: exact.
      np.testing.assert_array_equal(state.pos_count[d], reference.pos_count)
      np.testing.assert_array_equal(state.neg_count[d], reference.neg_count)
    # float32 against float64: each term is within a few ulp (softplus,
    # log10) and the sums have < 400 positive terms, so 2e-5 relative
    # bounds the rounding while a wrong coefficient (>= 1 % apart: the
    # counts differ by >= 1) cannot pass.
    np.testing.assert_allclose(loss, np.full(num_devices, ref_loss),
                               rtol=2e-5)
    # Each device's gradient is num_devices x its share (pmean convention).
    np.testing.assert_allclose(
        np.asarray(grads).reshape(batch, num_classes) / num_devices,
        ref_grads, rtol=2e-5, atol=1e-9)
  assert reference.pos_count[1] == steps * (batch // size)
  assert reference.neg_count.max() >= 2


def test_positivity_group_must_divide_the_batch():
  with pytest.raises(ValueError, match="divide the global batch of 6"):
    losses.adaptive_weights(jnp.zeros((6, 3)), losses.init_loss_state(3),
                            jax.random.PRNGKey(0), group_size=4)
