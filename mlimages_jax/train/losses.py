"""Losses: the ML-Images adaptive class-weighted sigmoid loss (§7) and plain CE.

The adaptive loss keeps state across steps (two counters per class), so it is a
pure function ``(logits, labels, state, rng) -> (loss, new_state)``; the state
is part of the train state and of every checkpoint.

Semantics, transcribed from the original ``train.py`` (ML_IMAGES.md §7):

* ``ce[n, c] = pos_weight * y * softplus(-z) + (1 - y) * softplus(z)`` (TF's
  ``weighted_cross_entropy_with_logits``); entries with label -1 contribute 0.
* "Average over the batch" is the original's ``reduce_mean(ce * mask, axis=0)``:
  the masked sum divided by the FULL batch size, not by the number of
  non-ignored entries (so an ignored entry counts as a zero-loss example).
* A class is positive in a batch if any label is ``>= mask_thres``.
  ``pos_count`` counts consecutive positive batches (reset on a negative-only
  batch). Negative-only classes are sampled with probability ``neg_select``;
  ``neg_count`` counts sampled negative-only batches since the class was last
  positive (reset on a positive batch, unchanged when not sampled).
* With the counts already updated: ``pos_coef = max(-log10((0.01 + pos_count) /
  10), 0.01)`` for positive classes, ``neg_coef = -log10((8 + neg_count) / 10)``
  if that is > 0.01 else 0.001 for sampled negative-only classes, 0 otherwise.
* ``loss = sum_c coef[c] * mean_n ce[n, c]``. The coefficients are constants
  for the gradient (they depend only on labels and counters).

Positivity groups (``group_size``, config ``loss.positivity_batch_size``):
the original decides "positive in this batch" over one GPU's batch. With a
group size P the global batch, in its global example order (the pmap axis
index, then the position on the device), is cut into consecutive groups of P
examples; the counters are updated group after group, exactly as P-example
steps of the original would update them, and each example's cross-entropy is
weighted by its own group's coefficients. ``group_size=0`` is one group: the
whole global batch. The loss is the mean over the groups of each group's
original loss (``sum_c coef_g[c] * mean_{n in g} ce[n, c]``), i.e. what the
original would average over that many consecutive steps.

Data parallelism (``axis_name`` given, inside ``pmap``): class positivity is
taken per group over the GLOBAL batch (groups may span or split devices) and
the sampling draws are device 0's, broadcast, so every device computes the
same coefficients and holds the same state — the state one device would hold
training on the whole global batch. The returned loss is this device's
share: ``pmean`` of it over ``axis_name`` is the global-batch loss, and
``pmean`` of its gradients is the global-batch gradient (the usual
data-parallel step).

`adaptive_weights` (counters -> per-example, per-class coefficients) and
`weighted_sigmoid_loss` (the loss given them) are separate so that gradient
accumulation can take the coefficients of the whole batch once and then
split it into micro-batches.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# Labels below zero (the annotation files' -1) mean "not annotated: ignore".
IGNORE_BELOW = 0.0


@flax.struct.dataclass
class LossState:
  """Per-class counters of the adaptive loss (float32 [num_classes] each)."""
  pos_count: jnp.ndarray
  neg_count: jnp.ndarray


def init_loss_state(num_classes: int) -> LossState:
  return LossState(pos_count=jnp.zeros((num_classes,), jnp.float32),
                   neg_count=jnp.zeros((num_classes,), jnp.float32))


def weighted_sigmoid_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                                   pos_weight: float) -> jnp.ndarray:
  """Element-wise TF ``weighted_cross_entropy_with_logits``; 0 where ignored."""
  valid = labels >= IGNORE_BELOW
  y = jnp.where(valid, labels, 0.0)
  ce = (pos_weight * y * jax.nn.softplus(-logits)
        + (1.0 - y) * jax.nn.softplus(logits))
  return jnp.where(valid, ce, 0.0)


def class_coefficients(positive: jnp.ndarray, selected: jnp.ndarray,
                       state: LossState) -> tuple[jnp.ndarray, LossState]:
  """Updates the counters and returns the per-class loss coefficients.

  Args:
    positive: float32 [C], 1 where the class is positive in the (global) batch.
    selected: float32 [C], 1 where the negative-sampling draw picked the class.
    state: the counters before this step.
  """
  negative = 1.0 - positive
  pos_count = (state.pos_count + 1.0) * positive
  neg_count = (state.neg_count + selected) * negative
  pos_coef = jnp.maximum(-jnp.log10((0.01 + pos_count) / 10.0), 0.01)
  neg_coef = -jnp.log10((8.0 + neg_count) / 10.0)
  neg_coef = jnp.where(neg_coef > 0.01, neg_coef, 0.001)
  coef = pos_coef * positive + neg_coef * negative * selected
  return coef, LossState(pos_count=pos_count, neg_count=neg_count)


def _group_positives(labels: jnp.ndarray, mask_thres: float, group_size: int,
                     axis_name: str | None
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(positive [G, C] over the global batch, group index [b] of each local
  example); see the module docstring for the order and the groups."""
  local = labels.shape[0]
  devices, index = 1, 0
  if axis_name is not None:
    devices = jax.lax.axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
  total = local * devices
  size = group_size or total
  if group_size < 0 or total % size:
    raise ValueError(f"positivity group size {group_size} must be >= 0 and "
                     f"divide the global batch of {total} examples")
  num_groups = total // size
  group = (index * local + jnp.arange(local)) // size
  hits = (labels >= mask_thres).astype(jnp.float32)
  positive = jnp.minimum(
      jax.ops.segment_sum(hits, group, num_segments=num_groups), 1.0)
  if axis_name is not None:
    positive = jax.lax.pmax(positive, axis_name)
  return positive, group


def adaptive_weights(labels: jnp.ndarray, state: LossState, rng: jax.Array,
                     *, mask_thres: float = 0.7, neg_select: float = 0.1,
                     group_size: int = 0, axis_name: str | None = None
                     ) -> tuple[jnp.ndarray, LossState]:
  """Updates the counters group by group; each example's class weights.

  Args:
    labels: [B, C] this device's labels (confidences, -1 = ignore).
    state: the counters (replicated across ``axis_name``).
    rng: key for the negative-class sampling: group g's draws are row g of
      ``uniform(rng, [G, C])`` (with one group, the step's single [C] draw).
      Under ``pmap`` only device 0's draws are used, so any per-device key
      works.
    mask_thres: a label at or above this makes its class positive.
    neg_select: probability of training a negative-only class in a group.
    group_size: examples per positivity group; 0 = the whole global batch.
    axis_name: the pmap/shard_map axis of the data-parallel batch, if any.

  Returns:
    (weights, new_state): float32 [B, C], the coefficients of each example's
    group, and the counters after the last group (identical on all devices).
  """
  labels = labels.astype(jnp.float32)
  if labels.ndim != 2 or state.pos_count.shape != labels.shape[1:]:
    raise ValueError(f"labels {labels.shape} must be [batch, num_classes] "
                     f"with the loss state's {state.pos_count.shape[0]} "
                     "classes")
  positive, group = _group_positives(labels, mask_thres, group_size,
                                     axis_name)
  draws = jax.random.uniform(rng, positive.shape, jnp.float32)
  if axis_name is not None:
    is_first = jax.lax.axis_index(axis_name) == 0
    draws = jax.lax.psum(jnp.where(is_first, draws, 0.0), axis_name)
  selected = (draws <= neg_select).astype(jnp.float32)

  def one_group(counters, group_inputs):
    coef, counters = class_coefficients(*group_inputs, counters)
    return counters, coef

  if positive.shape[0] == 1:  # One group (the default): no loop.
    coef, new_state = class_coefficients(positive[0], selected[0], state)
    return jnp.broadcast_to(coef, labels.shape), new_state
  new_state, coefs = jax.lax.scan(one_group, state, (positive, selected))
  return coefs[group], new_state


def weighted_sigmoid_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                          weights: jnp.ndarray, pos_weight: float = 12.0
                          ) -> jnp.ndarray:
  """``sum_c mean_n weights[n, c] * ce[n, c]``; weights are constants."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  if not logits.shape == labels.shape == weights.shape or logits.ndim != 2:
    raise ValueError(f"logits {logits.shape}, labels {labels.shape} and "
                     f"weights {weights.shape} must all be [batch, "
                     "num_classes]")
  ce = weighted_sigmoid_cross_entropy(logits, labels, pos_weight)
  return jnp.sum(jnp.mean(ce * jax.lax.stop_gradient(weights), axis=0))


def adaptive_sigmoid_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                          state: LossState, rng: jax.Array, *,
                          pos_weight: float = 12.0, mask_thres: float = 0.7,
                          neg_select: float = 0.1, group_size: int = 0,
                          axis_name: str | None = None
                          ) -> tuple[jnp.ndarray, LossState]:
  """The §7 loss for one step; see the module docstring for the semantics.

  Args:
    logits: [B, C] (any float dtype; computed in float32).
    labels, state, rng, mask_thres, neg_select, group_size, axis_name: as in
      `adaptive_weights`.
    pos_weight: weight of positive entries in the cross-entropy.

  Returns:
    (loss, new_state): this device's loss share (float32 scalar) and the
    updated counters (identical on all devices).
  """
  if logits.shape != labels.shape or logits.ndim != 2:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} must "
                     "both be [batch, num_classes]")
  if state.pos_count.shape != logits.shape[1:]:
    raise ValueError(f"loss state has {state.pos_count.shape[0]} classes, "
                     f"logits have {logits.shape[1]}")
  weights, new_state = adaptive_weights(
      labels, state, rng, mask_thres=mask_thres, neg_select=neg_select,
      group_size=group_size, axis_name=axis_name)
  return (weighted_sigmoid_loss(logits, labels, weights, pos_weight),
          new_state)


def sigmoid_cross_entropy(logits: jnp.ndarray,
                          labels: jnp.ndarray) -> jnp.ndarray:
  """Plain multi-label loss: sum over classes, batch mean; -1 ignored."""
  ce = weighted_sigmoid_cross_entropy(logits.astype(jnp.float32),
                                      labels.astype(jnp.float32), 1.0)
  return jnp.mean(jnp.sum(ce, axis=-1))


def softmax_cross_entropy(logits: jnp.ndarray, int_labels: jnp.ndarray,
                          num_classes: int) -> jnp.ndarray:
  """Single-label loss (fine-tuning, §8): mean over the batch."""
  if logits.shape[-1] != num_classes:
    raise ValueError(f"logits have {logits.shape[-1]} classes, expected "
                     f"{num_classes}")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  one_hot = jax.nn.one_hot(int_labels, num_classes, dtype=jnp.float32)
  return -jnp.mean(jnp.sum(one_hot * log_probs, axis=-1))
