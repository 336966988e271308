"""The optimizer: SGD with momentum, and the L2 term added to the loss.

Like the original (TF ``MomentumOptimizer`` with ``tf.nn.l2_loss`` in the
loss), weight decay is coupled L2, not decoupled decay, so it also passes
through the momentum; BN parameters have their own coefficient.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax.numpy as jnp
import ml_collections
import optax

from mlimages_jax.train import finetune


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule
                     ) -> optax.GradientTransformation:
  """SGD with (heavy-ball, TF MomentumOptimizer) momentum; L2 is in the loss.

  Frozen parameters get exactly zero updates (and no momentum state), so the
  L2 term in their gradient cannot move them either.
  """
  sgd = optax.sgd(learning_rate_fn, momentum=config.optimizer.momentum)
  if not config.freeze_blocks:
    return sgd
  return optax.multi_transform(
      {"trainable": sgd, "frozen": optax.set_to_zero()},
      functools.partial(finetune.freeze_labels,
                        freeze_blocks=config.freeze_blocks))


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
