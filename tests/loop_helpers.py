"""A fast stand-in for the training loop's model and step, for tests of
what the loop does around them (order of saves, stops, resumes), and the
synth_shapes config those tests train on."""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mlimages_jax.train import loop
from mlimages_jax.train import steps

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402


def shapes_config(data_dir: str):
  """The smoke recipe pointed at synth_shapes (fewshot_helpers.build) the
  way the errors say."""
  config = pretrain.get_config("smoke")
  config.dataset, config.data_dir = "synth_shapes", data_dir
  config.build_dataset_if_missing = False
  config.label_mode, config.loss.name = "single", "softmax"
  config.eval_split = "test"
  return config


class TinyModel(nn.Module):
  """Stands in for the ResNet where only the loop's order is tested: its
  state compiles in a moment (the smoke ResNet's init takes ~10 s)."""
  num_classes: int
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    pooled = nn.BatchNorm(use_running_average=not train)(x.mean((1, 2)))
    return nn.Dense(self.num_classes)(pooled), pooled


def instant_train_step(*args, **kwargs):
  """A train step that compiles at once: the state unchanged, finite."""
  del args, kwargs

  def step(state, batch):
    del batch
    zero = jnp.zeros(())
    return state, {"finite": jnp.ones(()), "loss": zero,
                   "weight_decay_loss": zero, "total_loss": zero,
                   "grad_norm": zero, "learning_rate": zero}
  return jax.pmap(step)


def use_instant_steps(monkeypatch: pytest.MonkeyPatch) -> None:
  """The loop trains `TinyModel` with `instant_train_step`."""
  monkeypatch.setattr(steps, "pmap_train_step", instant_train_step)
  monkeypatch.setattr(loop, "create_model",
                      lambda config, num_classes: TinyModel(num_classes))
