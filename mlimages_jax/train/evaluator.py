"""Validation during training: the evaluation tool's path on the train state.

The loop evaluates exactly as ``mlimages evaluate`` does
(`evaluation.evaluator.evaluate_model`: the streaming, bounded-memory,
multi-host evaluator, on the whole split unless `num_eval_examples` > 0), so
an in-loop number and the tool's number on that step's checkpoint agree.
Like the tool, it runs the network in float32 whatever `config.dtype` trains
in. Each evaluation writes ``<workdir>/eval/<step>/eval_results.json``
(per-class results included); the loop logs the headline numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from etils import epath

from mlimages_jax.evaluation import evaluator
from mlimages_jax.inference import predict
from mlimages_jax.train import distributed
from mlimages_jax.train.state import TrainState

EVAL_DIR = "eval"


class Evaluator:
  """Evaluates the train state of one run; every process calls `run`."""

  def __init__(self, config: ml_collections.ConfigDict,
               metadata: Mapping[str, Any], workdir: epath.Path):
    self.config = config
    self.metadata = metadata
    self.workdir = workdir

  def run(self, state: TrainState, image_size: int,
          step: int) -> dict[str, float]:
    """Evaluates the replicated `state` of `step` at `image_size`.

    Returns ``{"mAP"}`` for multi-label runs, ``{"top1", "top5"}`` for
    single-label ones (what the run log records).
    """
    config = self.config
    variables = distributed.unreplicate(
        {"params": state.params, "batch_stats": state.batch_stats})
    model = predict.LoadedModel(
        variables, dict(self.metadata, step=step),
        source=f"{self.workdir} (train state at step {step})")
    results = evaluator.evaluate_model(
        model, dataset=config.dataset, data_dir=config.data_dir or None,
        split=config.eval_split, image_size=image_size,
        batch_size=config.eval_batch_size,
        workdir=self.workdir / EVAL_DIR / str(step),
        num_examples=max(config.num_eval_examples, 0),
        preprocess=dict(config.preprocess) or None,
        progress=jax.process_index() == 0)
    result = results["results"][str(image_size)]
    if config.label_mode == "single":
      return {"top1": result["top1"], "top5": result["top5"]}
    # null in the results file when no class has a positive.
    return {"mAP": math.nan if result["map"] is None else result["map"]}
