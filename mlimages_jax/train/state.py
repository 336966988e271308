"""The train state: everything that changes during training, saved whole.

A run's state is explicit: parameters, BN moving statistics, optimizer
(momentum) state, the adaptive loss's class counters, the RNG key and the
step. `create_train_state` makes the same state on every process for a seed.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mlimages_jax.models import resnet
from mlimages_jax.train import losses
from mlimages_jax.train.distributed import AXIS_NAME

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.dtype


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; saved whole in checkpoints."""
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  loss_state: losses.LossState
  rng: jnp.ndarray


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> resnet.ResNet:
  return resnet.create_model(
      config.model.depth, num_classes,
      width_multiplier=config.model.width_multiplier,
      dtype=DTYPES[config.dtype], bn_momentum=config.model.bn_momentum,
      bn_axis_name=AXIS_NAME if config.model.sync_batch_norm else None)


def create_train_state(rng: jax.Array, model: resnet.ResNet, image_size: int,
                       tx: optax.GradientTransformation) -> TrainState:
  """A fresh, unreplicated train state (the same on every process per seed)."""
  init_rng, state_rng = jax.random.split(rng)

  @jax.jit
  def init(rng):
    shape = (1, image_size, image_size, 3)
    # BN with an axis name needs the axis bound; init runs unmapped.
    init_model = model.clone(bn_axis_name=None)
    return init_model.init(rng, jnp.zeros(shape, jnp.float32), train=False)

  variables = init(init_rng)
  params, batch_stats = variables["params"], variables["batch_stats"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params),
      loss_state=losses.init_loss_state(model.num_classes), rng=state_rng)
