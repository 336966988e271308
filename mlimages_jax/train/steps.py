"""The compiled per-device steps: one SGD step and one evaluation forward.

Both run under ``jax.pmap`` over `AXIS_NAME`; the collectives that make them
data-parallel are the ``pmean`` calls in `train_step` (gradients, BN moving
statistics, logged losses) and the adaptive loss's class positivity count
(in `losses.adaptive_sigmoid_loss`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

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


def _data_loss(config: ml_collections.ConfigDict, logits: jnp.ndarray,
               labels: jnp.ndarray, loss_state: losses.LossState,
               rng: jax.Array) -> tuple[jnp.ndarray, losses.LossState]:
  name = config.loss.name
  if name == "adaptive_sigmoid":
    return losses.adaptive_sigmoid_loss(
        logits, labels, loss_state, rng, pos_weight=config.loss.pos_weight,
        mask_thres=config.loss.mask_thres, neg_select=config.loss.neg_select,
        axis_name=AXIS_NAME)
  if name == "sigmoid":
    return losses.sigmoid_cross_entropy(logits, labels), loss_state
  return (losses.softmax_cross_entropy(logits, labels, logits.shape[-1]),
          loss_state)


def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], *,
               model: resnet.ResNet, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict,
               bn_modules: frozenset[tuple[str, ...]],
               learning_rate_fn: optax.Schedule | None = None
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One SGD step on one device's shard; run under pmap(axis_name='batch').

  A non-finite loss or gradient leaves the state untouched (only `step`
  advances) and reports ``finite=0``; the host stops at its next check, so
  the last good state is what gets checkpointed. With `learning_rate_fn`
  (the optimizer's schedule) the metrics include the step's
  ``learning_rate``: computed here, the host never runs (and waits for)
  device ops of its own to log it.
  """
  # The same key on every device: the adaptive loss's negative-class sampling
  # must agree everywhere so that all devices keep identical counters.
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    (logits, _), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        model_inputs(batch), train=True, mutable=["batch_stats"])
    data_loss, loss_state = _data_loss(config, logits, batch["labels"],
                                       state.loss_state, rng)
    decay = optimizer.weight_decay_penalty(params, bn_modules,
                                           config.optimizer.weight_decay,
                                           config.optimizer.weight_decay_bn)
    return data_loss + decay, (data_loss, decay, loss_state,
                               updates["batch_stats"])

  grads, (data_loss, decay, loss_state, batch_stats) = jax.grad(
      loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS_NAME)
  batch_stats = jax.lax.pmean(batch_stats, AXIS_NAME)
  if config.freeze_blocks:
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


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def eval_step(state: TrainState, batch: Mapping[str, jnp.ndarray], *,
              model: resnet.ResNet, config: ml_collections.ConfigDict
              ) -> jnp.ndarray:
  """Class scores for ranking: logits for the multi-label losses (a sigmoid
  would saturate confident scores into float32 ties that change the AP),
  softmax probabilities for single-label models."""
  logits, _ = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      model_inputs(batch), train=False)
  if config.label_mode == "single":
    return jax.nn.softmax(logits)
  return logits


def pmap_train_step(model: resnet.ResNet, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    bn_modules: frozenset[tuple[str, ...]],
                    learning_rate_fn: optax.Schedule | None = None
                    ) -> Callable:
  return jax.pmap(
      functools.partial(train_step, model=model, tx=tx, config=config,
                        bn_modules=bn_modules,
                        learning_rate_fn=learning_rate_fn),
      axis_name=AXIS_NAME, donate_argnums=(0,))


def pmap_eval_step(model: resnet.ResNet,
                   config: ml_collections.ConfigDict) -> Callable:
  return jax.pmap(functools.partial(eval_step, model=model, config=config),
                  axis_name=AXIS_NAME)


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
