"""Few-shot probes of the backbone during training (config group `fewshot`).

Every `fewshot.every_steps` steps (and at the end) the features of the
current train state are probed on the configured datasets by
`evaluation.fewshot.FewshotEvaluator`; the accuracies go to metrics.jsonl
and TensorBoard as ``fewshot/<dataset>_<k>shot``.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import ml_collections

from mlimages_jax.evaluation import fewshot
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet
from mlimages_jax.train import run_log
from mlimages_jax.train import schedule
from mlimages_jax.train.state import TrainState


def pmap_features_step(model: resnet.ResNet) -> Callable:
  """(replicated state, uint8 images) -> pooled features, per device."""
  def features(state: TrainState, images):
    _, pooled = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        preprocessing.normalize(images), train=False)
    return pooled
  return jax.pmap(features)


class Probes:
  """The run's few-shot probes, or nothing when `fewshot.every_steps` is 0."""

  def __init__(self, config: ml_collections.ConfigDict, model: resnet.ResNet):
    self.config = config
    self.every = config.fewshot.every_steps
    if self.every:
      self.evaluator = fewshot.from_config(config.fewshot,
                                           config.data_dir or None)
      self.p_features = pmap_features_step(model)

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def run(self, state: TrainState, log: run_log.RunLog, step: int) -> None:
    """Probes the replicated `state`; every process calls this."""
    if not self.every:
      return
    start = time.perf_counter()
    image_size = (self.config.fewshot.image_size
                  or schedule.image_size_at(self.config, max(step, 1)))
    results = self.evaluator.run(
        lambda images: self.p_features(state, images), image_size)
    log.fewshot(step, image_size, results, time.perf_counter() - start)
    log.mark(step)  # The training rate excludes the probes.
