"""What a run reports: ``metrics.jsonl``, TensorBoard and the console.

Only process 0 writes. Training lines carry the mean loss of the steps since
the last report, the learning rate, the training rate and the images that
failed to decode; evaluation lines the split's metrics. The rate is measured
between two points where the host waited for the devices (`mark`), so it
excludes evaluation and, after the first report, compilation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath

from mlimages_jax import fileio

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


class MetricsLog:
  """``W/metrics.jsonl``: one JSON object per line, appended and flushed
  (local or remote, see `fileio.append_text`)."""

  def __init__(self, path: str | os.PathLike, enabled: bool):
    self.path = fileio.as_path(path)
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """On resume, drop lines past the restored step (they will be redone)."""
    if not self.enabled or not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    with fileio.atomic_writer(self.path) as f:
      f.write("".join(f"{line}\n" for line in kept))

  def write(self, record: Mapping[str, Any]) -> None:
    if self.enabled:
      fileio.append_text(self.path, json.dumps(record) + "\n")


class RunLog:
  """The run's reports: one object the loop calls at its reporting points."""

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict,
               total_steps: int, is_chief: bool):
    self.config = config
    self.total_steps = total_steps
    self.writer = metric_writers.create_default_writer(
        str(workdir), just_logging=not is_chief, asynchronous=True)
    self.metrics = MetricsLog(workdir / METRICS_FILE, enabled=is_chief)
    self._mark = (0, time.perf_counter())
    if is_chief:
      with fileio.atomic_writer(workdir / CONFIG_FILE) as f:
        f.write(config.to_json_best_effort(indent=2))
      self.writer.write_hparams(_flatten(config.to_dict()))

  def resumed(self, step: int) -> None:
    """Drops the lines a resumed run will write again."""
    self.metrics.truncate_after(step)

  def mark(self, step: int) -> None:
    """The host has just waited for the devices at `step`: the rate's start."""
    self._mark = (step, time.perf_counter())

  def train(self, host_metrics: list[tuple[int, Mapping[str, np.ndarray]]],
            decode_failures: int) -> None:
    """Logs the steps of `host_metrics`; the devices are done with the last."""
    step, now = host_metrics[-1][0], time.perf_counter()
    images_per_sec = ((step - self._mark[0]) * self.config.batch_size
                      / max(now - self._mark[1], 1e-9))
    self._mark = (step, now)
    summary = {k: float(np.mean([m[k] for _, m in host_metrics]))
               for k in ("loss", "weight_decay_loss", "total_loss",
                         "grad_norm")}
    summary["learning_rate"] = float(host_metrics[-1][1]["learning_rate"])
    # Images that failed to decode were skipped by the pipeline; a multi-day
    # run reports them instead of crashing.
    summary["decode_failures"] = decode_failures
    self.writer.write_scalars(step, dict(summary,
                                         images_per_sec=images_per_sec))
    self.metrics.write({"step": step, "loss": summary["loss"],
                        "learning_rate": summary["learning_rate"],
                        "images_per_sec": images_per_sec,
                        "decode_failures": decode_failures})
    remaining = ((self.total_steps - step) * self.config.batch_size
                 / images_per_sec)
    logging.info("step %d/%d  loss %.4f  lr %.4g  %.1f img/s  eta %s", step,
                 self.total_steps, summary["loss"], summary["learning_rate"],
                 images_per_sec, _duration(remaining))

  def evaluation(self, step: int, image_size: int,
                 results: Mapping[str, float], seconds: float) -> None:
    split = self.config.eval_split
    logging.info("step %d: %s at %d px: %s (%.1f s)", step, split, image_size,
                 "  ".join(f"{k} {v:.4f}" for k, v in results.items()),
                 seconds)
    self.writer.write_scalars(step, {f"{split}_{k}": v for k, v in
                                     dict(results, seconds=seconds).items()})
    self.metrics.write({"step": step, "split": split,
                        "image_size": image_size, **results,
                        "seconds": round(seconds, 3)})

  def fewshot(self, step: int, image_size: int, results: Mapping[str, float],
              seconds: float) -> None:
    """Few-shot probe accuracies (``fewshot/<dataset>_<k>shot``)."""
    logging.info("step %d: few-shot at %d px: %s (%.1f s)", step, image_size,
                 "  ".join(f"{k} {v:.4f}" for k, v in results.items()),
                 seconds)
    scalars = {f"fewshot/{k}": v for k, v in results.items()}
    self.writer.write_scalars(step, scalars)
    self.metrics.write({"step": step, "fewshot_image_size": image_size,
                        "fewshot_seconds": round(seconds, 3), **scalars})

  def flush(self) -> None:
    self.writer.flush()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = (value if isinstance(value, (int, float, str,
                                                            bool))
                                else str(value))
  return flat


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
