"""Validation during training: metrics of the current train state."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mlimages_jax.evaluation import metrics as metrics_lib
from mlimages_jax.inputs import pipeline
from mlimages_jax.train import inputs
from mlimages_jax.train.state import TrainState


class Evaluator:
  """Validation metrics over the eval split (or its first `num_eval_examples`).

  Multi-label: ``{"mAP"}``; single-label: ``{"top1", "top5"}`` (top-k
  accuracy, ties resolved in the model's favour as in `metrics.top_k_correct`).
  The eval iterator yields the same number of (padded, masked) batches on
  every process, which keeps the SPMD program in lockstep; the scores of all
  processes are then gathered and ranked on the host.
  """

  def __init__(self, config: ml_collections.ConfigDict, p_eval_step: Callable):
    self.config = config
    self.p_eval_step = p_eval_step

  def run(self, state: TrainState, image_size: int) -> dict[str, float]:
    """`state` is replicated on the local devices; every process calls this."""
    config = self.config
    iterator = inputs.create_eval_iterator(config, image_size)
    num_batches = iterator.num_batches
    if config.num_eval_examples > 0:
      num_batches = min(num_batches, math.ceil(config.num_eval_examples
                                               / config.eval_batch_size))
    batches = pipeline.prefetch_to_device(iterator, 2)
    scores, labels, masks = [], [], []
    for batch in itertools.islice(batches, num_batches):
      scores.append(self.p_eval_step(state, batch))
      labels.append(batch["labels"])
      masks.append(batch["mask"])
    scores, labels, masks = (
        np.concatenate([np.asarray(x).reshape(-1, *x.shape[2:]) for x in xs])
        for xs in (scores, labels, masks))
    if jax.process_count() > 1:
      scores, labels, masks = multihost_utils.process_allgather(
          (scores, labels, masks), tiled=True)
    if config.label_mode == "single":
      accumulator = metrics_lib.SingleLabelAccumulator(top_k=(1, 5))
      accumulator.update(scores, labels, masks)
      result = accumulator.result()
      return {"top1": result["top1"], "top5": result["top5"]}
    keep = masks > 0
    return {"mAP": metrics_lib.mean_average_precision(scores[keep],
                                                      labels[keep])}
