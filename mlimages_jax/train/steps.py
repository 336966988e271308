"""The compiled per-device training step (evaluation runs the evaluation
tool's forward pass, train/evaluator.py).

It runs under ``jax.pmap`` over `AXIS_NAME`; the collectives that make it
data-parallel are the ``pmean`` calls in `train_step` (gradients, BN moving
statistics, logged losses) and the adaptive loss's class positivity count
(in `losses.adaptive_weights`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet
from mlimages_jax.train import finetune
from mlimages_jax.train import losses
from mlimages_jax.train import optimizer
from mlimages_jax.train.distributed import AXIS_NAME
from mlimages_jax.train.state import TrainState


def model_inputs(batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
  """Model inputs in [-1, 1]; the colour distortion, if the batch asks, here.

  The input pipeline ships uint8 pixels plus per-example colour parameters
  and leaves the colour maths to the accelerator (host CPUs are the scarce
  resource); batches without a ``colour`` key are only normalised.
  """
  image = batch["image"]
  if "colour" in batch:
    return preprocessing.device_augment(image, batch["colour"])
  return preprocessing.normalize(image) if image.dtype == jnp.uint8 else image


def _loss_weights(config: ml_collections.ConfigDict, labels: jnp.ndarray,
                  loss_state: losses.LossState, rng: jax.Array
                  ) -> tuple[jnp.ndarray | None, losses.LossState]:
  """The adaptive loss's class weights for the whole step (None otherwise).

  Taken once from the labels of the whole global batch, before it is cut
  into micro-batches: accumulation must not change the coefficients.
  """
  if config.loss.name != "adaptive_sigmoid":
    return None, loss_state
  return losses.adaptive_weights(
      labels, loss_state, rng, mask_thres=config.loss.mask_thres,
      neg_select=config.loss.neg_select,
      group_size=config.loss.positivity_batch_size, axis_name=AXIS_NAME)


def _data_loss(config: ml_collections.ConfigDict, logits: jnp.ndarray,
               labels: jnp.ndarray, weights: jnp.ndarray | None
               ) -> jnp.ndarray:
  """The mean data loss of a (micro-)batch."""
  name = config.loss.name
  if name == "adaptive_sigmoid":
    return losses.weighted_sigmoid_loss(logits, labels, weights,
                                        config.loss.pos_weight)
  if name == "sigmoid":
    return losses.sigmoid_cross_entropy(logits, labels)
  return losses.softmax_cross_entropy(logits, labels, logits.shape[-1])


def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], *,
               model: resnet.ResNet, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict,
               bn_modules: frozenset[tuple[str, ...]],
               learning_rate_fn: optax.Schedule | None = None,
               loop_micro_batches: bool = True
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One SGD step on one device's shard; run under pmap(axis_name='batch').

  A non-finite loss or gradient leaves the state untouched (only `step`
  advances) and reports ``finite=0``; the host stops at its next check, so
  the last good state is what gets checkpointed. With `learning_rate_fn`
  (the optimizer's schedule) the metrics include the step's
  ``learning_rate``: computed here, the host never runs (and waits for)
  device ops of its own to log it.

  Gradient accumulation (``config.accumulate_steps`` = A): the device's
  shard is cut into A consecutive micro-batches, run one after another from
  the same parameters; their gradients, losses and updated BN moving
  statistics are averaged, exactly what A times as many devices would
  average with ``pmean``. So the update equals the unaccumulated step on A
  times the devices; on the same devices it differs only in that BN
  normalises each micro-batch with its own statistics (B/A per device
  instead of B; with sync BN, the micro-batch across devices) and the moving
  averages are the mean of A updates from those statistics. The
  micro-batches run in a loop (`loop_micro_batches`, the point of
  accumulating: one micro-batch's activations in memory) or unrolled (for
  XLA's CPU backend, see `_accumulate`).
  """
  # The same key on every device: the adaptive loss's negative-class sampling
  # must agree everywhere so that all devices keep identical counters.
  rng = jax.random.fold_in(state.rng, state.step)
  weights, loss_state = _loss_weights(config, batch["labels"],
                                      state.loss_state, rng)
  micro_batch = dict(batch)
  if weights is not None:
    micro_batch["weights"] = weights

  def micro_step(micro):
    """(grads, BN statistics, data loss) of one micro-batch."""
    def micro_loss(params):
      (logits, _), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats},
          model_inputs(micro), train=True, mutable=["batch_stats"])
      data_loss = _data_loss(config, logits, micro["labels"],
                             micro.get("weights"))
      return data_loss, updates["batch_stats"]
    (data_loss, batch_stats), grads = jax.value_and_grad(
        micro_loss, has_aux=True)(state.params)
    return grads, batch_stats, data_loss

  count = config.accumulate_steps
  if count == 1:
    # The default: the network straight in the step's program, no loop
    # around it (a one-trip scan made the demo's step 5x slower on CPU).
    grads, batch_stats, data_loss = micro_step(micro_batch)
  else:
    grads, batch_stats, data_loss = _accumulate(
        micro_step, micro_batch, count, loop_micro_batches)
  decay, decay_grads = jax.value_and_grad(optimizer.weight_decay_penalty)(
      state.params, bn_modules,
      *optimizer.loss_weight_decay(config.optimizer))
  grads = jax.tree.map(jnp.add, grads, decay_grads)
  grads = jax.lax.pmean(grads, AXIS_NAME)
  batch_stats = jax.lax.pmean(batch_stats, AXIS_NAME)
  if config.freeze_blocks and config.frozen_blocks_batch_stats == "keep":
    # Frozen BN layers normalise with batch statistics like the rest but
    # keep their moving averages: the updates are discarded.
    batch_stats = flax.traverse_util.path_aware_map(
        lambda path, new: (_lookup(state.batch_stats, path)
                           if finetune.is_frozen(path, config.freeze_blocks)
                           else new),
        batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = jax.lax.pmean(
      {"loss": data_loss, "weight_decay_loss": decay,
       "total_loss": data_loss + decay}, AXIS_NAME)
  metrics["grad_norm"] = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(
      metrics["grad_norm"])
  metrics["finite"] = finite.astype(jnp.float32)
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  updated = state.replace(params=params, batch_stats=batch_stats,
                          opt_state=opt_state, loss_state=loss_state)
  guarded = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                         updated, state)
  return guarded.replace(step=state.step + 1), metrics


def _accumulate(micro_step: Callable, batch: dict[str, jnp.ndarray],
                count: int, loop: bool) -> Any:
  """The mean of `micro_step` over `count` consecutive slices of `batch`.

  With `loop` (accelerators) a ``fori_loop``: one copy of the network in
  the program and one micro-batch's activations in memory. XLA's CPU
  backend leaves the weight-gradient convolutions of a loop body in a form
  it runs 3-4x slower (measured on the demo's network), so CPUs unroll: they
  accumulate to emulate a larger batch, not to save memory.
  """
  micro_batches = jax.tree.map(
      lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)

  def micro(i):
    return micro_step(jax.tree.map(lambda x: x[i], micro_batches))

  if not loop:
    totals = jax.tree.map(lambda *parts: sum(parts),
                          *[micro(i) for i in range(count)])
  else:
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro, 0))
    totals = jax.lax.fori_loop(
        0, count, lambda i, t: jax.tree.map(jnp.add, t, micro(i)), zeros)
  return jax.tree.map(lambda t: t / count, totals)


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def pmap_train_step(model: resnet.ResNet, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    bn_modules: frozenset[tuple[str, ...]],
                    learning_rate_fn: optax.Schedule | None = None,
                    devices: Sequence[jax.Device] | None = None) -> Callable:
  """`train_step` under ``pmap`` over `devices` (default: the local ones,
  another platform's for compiling ahead, train/compile_ahead.py)."""
  platform = (devices or jax.local_devices())[0].platform
  return jax.pmap(
      functools.partial(train_step, model=model, tx=tx, config=config,
                        bn_modules=bn_modules,
                        learning_rate_fn=learning_rate_fn,
                        loop_micro_batches=platform != "cpu"),
      axis_name=AXIS_NAME, donate_argnums=(0,), devices=devices)


def check_finite(history: list[tuple[int, dict[str, np.ndarray]]],
                 last_checkpoint: int | None) -> None:
  """Stops the run at the first step whose update `train_step` refused."""
  for step, values in history:
    if not values["finite"]:
      raise FloatingPointError(
          f"Training stopped: the loss or the gradients became NaN/Inf at "
          f"step {step} (loss={float(values['loss'])}, "
          f"grad_norm={float(values['grad_norm'])}). That update was not "
          f"applied; the last checkpoint is step {last_checkpoint}. Lower "
          f"the learning rate (config.schedule) or check the input data.")
