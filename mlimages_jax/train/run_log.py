"""What a run reports: ``metrics.jsonl``, TensorBoard and the console.

Only process 0 writes. Training lines carry the mean loss of the steps since
the last report, the learning rate, the training rate, the images that
failed to decode and where the loop's wall time went: the shares it spent
blocked on the input pipeline and on the devices (`waiting`); evaluation
lines the split's metrics. The rate and the shares are measured between two
points where the host waited for the devices (`mark`), so they exclude
evaluation and, after the first report, compilation. `Profile` writes a
`jax.profiler` trace of a few steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath

from mlimages_jax import fileio

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PROFILE_DIR = "profile"  # W/profile/plugins/profile/<time>/<host>.xplane.pb
WAITS = ("input", "device")  # What the loop blocks on (`RunLog.waiting`).


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
    self._waited = dict.fromkeys(WAITS, 0.0)
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
    self._waited = dict.fromkeys(WAITS, 0.0)

  @contextlib.contextmanager
  def waiting(self, cause: str) -> Iterator[None]:
    """Times a point where the loop blocks on `cause` ("input": the next
    batch; "device": a step's results), for the interval's wait shares."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._waited[cause] += time.perf_counter() - start

  def train(self, host_metrics: list[tuple[int, Mapping[str, np.ndarray]]],
            decode_failures: int) -> None:
    """Logs the steps of `host_metrics`; the devices are done with the last."""
    step, now = host_metrics[-1][0], time.perf_counter()
    seconds = max(now - self._mark[1], 1e-9)
    images_per_sec = (step - self._mark[0]) * self.config.batch_size / seconds
    # Shares of the interval's wall time: an input-bound run shows a high
    # input share, a device-bound one a high device share.
    waits = {f"{cause}_wait_share": round(waited / seconds, 4)
             for cause, waited in self._waited.items()}
    self.mark(step)
    summary = {k: float(np.mean([m[k] for _, m in host_metrics]))
               for k in ("loss", "weight_decay_loss", "total_loss",
                         "grad_norm")}
    summary["learning_rate"] = float(host_metrics[-1][1]["learning_rate"])
    # Images that failed to decode were skipped by the pipeline; a multi-day
    # run reports them instead of crashing.
    summary["decode_failures"] = decode_failures
    self.writer.write_scalars(step, dict(summary, **waits,
                                         images_per_sec=images_per_sec))
    self.metrics.write({"step": step, "loss": summary["loss"],
                        "learning_rate": summary["learning_rate"],
                        "images_per_sec": images_per_sec,
                        "decode_failures": decode_failures, **waits})
    remaining = ((self.total_steps - step) * self.config.batch_size
                 / images_per_sec)
    logging.info("step %d/%d  loss %.4f  lr %.4g  %.1f img/s (waiting: "
                 "input %.0f%%, devices %.0f%%)  eta %s", step,
                 self.total_steps, summary["loss"], summary["learning_rate"],
                 images_per_sec, 100 * waits["input_wait_share"],
                 100 * waits["device_wait_share"], _duration(remaining))

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


class Profile:
  """A `jax.profiler` trace of `config.profile.num_steps` steps into
  ``W/profile`` (TensorBoard's profile tab), after `after_steps` steps of
  this run: compilation and the input warm-up are not what a user wants to
  see. Process 0 traces its own devices (a trace per host is rarely needed
  and all would land in one folder). Off (num_steps 0): does nothing.
  """

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict,
               start_step: int, is_chief: bool):
    self.logdir = workdir / PROFILE_DIR
    self.first = start_step + config.profile.after_steps + 1
    self.last = (self.first + config.profile.num_steps - 1
                 if config.profile.num_steps and is_chief else -1)
    self.tracing = False

  def start_at(self, step: int) -> None:
    """Called before `step` is dispatched."""
    if step == self.first and self.last >= step:
      logging.info("step %d: profiling steps %d-%d into %s.", step, step,
                   self.last, self.logdir)
      jax.profiler.start_trace(str(self.logdir))
      self.tracing = True

  def ends_at(self, step: int) -> bool:
    """Whether the trace stops once `step` is done (then wait, and `stop`)."""
    return self.tracing and step == self.last

  def stop(self) -> None:
    """Ends the trace (if one runs) and writes it; also when a run ends or
    fails inside the traced steps."""
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()


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
