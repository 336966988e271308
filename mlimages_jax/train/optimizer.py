"""The optimizers, chosen by ``config.optimizer.name``, and weight decay.

``sgd`` (the recipe's): SGD with heavy-ball momentum (TF
``MomentumOptimizer``) and, like the original (``tf.nn.l2_loss`` in the
loss), coupled L2 weight decay added to the LOSS by the train step
(`weight_decay_penalty`), so it also passes through the momentum; BN
parameters have their own coefficient.

``lars``, ``lamb``, ``adamw`` (optax's): decoupled weight decay inside the
optimizer, the standard for them, and no L2 term in the loss
(`loss_weight_decay` is zero). Their decay skips every parameter of rank <= 1
(BN scale/offset and all biases), and so does LARS's trust ratio (You et al.
2017; Goyal et al. 2017): in this network those are exactly the 1-D
parameters, the kernels being 2-D (dense) or 4-D (convolutions). LAMB's
trust ratio, as optax writes it, applies to every parameter.

Each optimizer reads its own fields (`FIELDS`); ``clip_global_norm`` (0 =
off) clips the whole gradient by its global norm before any of them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mlimages_jax.train import finetune
from mlimages_jax.train import schedule as schedule_lib

# optimizer.name -> the fields of config.optimizer it reads, besides `name`
# and `clip_global_norm` (read by all).
FIELDS = {
    "sgd": ("momentum", "weight_decay", "weight_decay_bn"),
    "lars": ("momentum", "weight_decay", "trust_coefficient"),
    "lamb": ("b1", "b2", "eps", "weight_decay"),
    "adamw": ("b1", "b2", "eps", "weight_decay"),
}
COMMON_FIELDS = ("name", "clip_global_norm")


def decay_mask(params: Any) -> Any:
  """True for the parameters decoupled decay (and LARS's trust ratio) scale:
  those of rank >= 2, i.e. all but BN scale/offset and biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _by_name(o: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
             ) -> optax.GradientTransformation:
  """The optimizer `o.name` with its fields (`FIELDS`)."""
  if o.name == "sgd":
    return optax.sgd(learning_rate_fn, momentum=o.momentum)
  if o.name == "lars":
    return optax.lars(learning_rate_fn, weight_decay=o.weight_decay,
                      weight_decay_mask=decay_mask,
                      trust_coefficient=o.trust_coefficient,
                      trust_ratio_mask=decay_mask, momentum=o.momentum)
  if o.name == "lamb":
    return optax.lamb(learning_rate_fn, b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=decay_mask)
  if o.name == "adamw":
    return optax.adamw(learning_rate_fn, b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay, mask=decay_mask)
  raise ValueError(f"config.optimizer.name {o.name!r} is not one of "
                   f"{sorted(FIELDS)}")


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule
                     ) -> optax.GradientTransformation:
  """The optimizer of ``config.optimizer`` (the recipe's SGD by default).

  Frozen parameters get exactly zero updates (and no optimizer state), so
  the L2 term in their gradient cannot move them either; gradient clipping
  sees only the trainable ones.
  """
  tx = _by_name(config.optimizer, learning_rate_fn)
  if config.optimizer.clip_global_norm:
    tx = optax.chain(
        optax.clip_by_global_norm(config.optimizer.clip_global_norm), tx)
  if not config.freeze_blocks:
    return tx
  return optax.multi_transform(
      {"trainable": tx, "frozen": optax.set_to_zero()},
      functools.partial(finetune.freeze_labels,
                        freeze_blocks=config.freeze_blocks))


def loss_weight_decay(o: ml_collections.ConfigDict) -> tuple[float, float]:
  """(weight_decay, weight_decay_bn) of the L2 term in the loss: the
  config's for ``sgd``, zero for the optimizers that decay weights
  themselves (so the train step adds no penalty)."""
  if o.name == "sgd":
    return o.weight_decay, o.weight_decay_bn
  return 0.0, 0.0


def optimization_record(config: ml_collections.ConfigDict
                        ) -> dict[str, Any]:
  """The optimizer and schedule of a run as checkpoint metadata records them
  (``store.make_metadata(optimization=...)``): each name with only the
  fields it reads, and the global batch the schedule is scaled to."""
  def chosen(group: str, fields: dict[str, tuple[str, ...]],
             common: tuple[str, ...]) -> dict[str, Any]:
    values = config[group]
    return {key: list(values[key]) if isinstance(values[key], tuple)
            else values[key] for key in (*common, *fields[values.name])}

  return {"optimizer": chosen("optimizer", FIELDS, COMMON_FIELDS),
          "schedule": chosen("schedule", schedule_lib.FIELDS,
                             schedule_lib.COMMON_FIELDS),
          "batch_size": config.batch_size}


def batch_norm_modules(batch_stats: Any) -> frozenset[tuple[str, ...]]:
  """Paths of the BN modules: exactly the modules that own batch statistics."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(batch_stats))
  return frozenset(path[:-1] for path in flat)


def weight_decay_penalty(params: Any, bn_modules: frozenset[tuple[str, ...]],
                         weight_decay: float,
                         weight_decay_bn: float = 0.0) -> jnp.ndarray:
  """``wd * sum(w**2) / 2`` over non-BN parameters (TF's ``tf.nn.l2_loss``).

  BN scale/offset get ``weight_decay_bn`` (0 in pre-training, 0.1 x 1e-4 in
  the original fine-tuning).
  """
  total = jnp.zeros((), jnp.float32)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for path, value in flat.items():
    coefficient = weight_decay_bn if path[:-1] in bn_modules else weight_decay
    if coefficient:
      total += coefficient * 0.5 * jnp.sum(jnp.square(value.astype(
          jnp.float32)))
  return total
