"""Training in a background thread while the caller redraws (notebooks).

A notebook cell that trains in its own thread stays free to plot the
metrics as they arrive, but an interrupted cell (the stop button, a cell
time limit) only interrupts the cell: a plain thread would go on training
inside the kernel, and rerunning the cell would start a second run into the
same workdir. Here an interrupt stops the run itself, at its next step and
with that step's checkpoint (`loop.train_and_evaluate`'s `stop`), before
the cell ends; rerunning resumes from it.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import ml_collections

from mlimages_jax.train import loop
from mlimages_jax.train.state import TrainState


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          poll: Callable[[], None], poll_seconds: float) -> TrainState:
  """`loop.train_and_evaluate` in a thread; calls `poll()` every
  `poll_seconds` while it runs and once at the end (e.g. to redraw a plot).

  Returns the final state or raises what the run raised. On
  KeyboardInterrupt (here, in `poll` or while waiting) the run is stopped
  and awaited, then `preemption.Preempted` names the step saved (or the
  interrupt is re-raised if the run had ended anyway).
  """
  stop = threading.Event()
  outcome: dict[str, object] = {}

  def run() -> None:
    try:
      outcome["state"] = loop.train_and_evaluate(config, workdir, stop)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised)
      outcome["error"] = e

  thread = threading.Thread(target=run, name="mlimages-train", daemon=True)
  thread.start()
  try:
    while thread.is_alive():
      thread.join(poll_seconds)
      poll()
  except KeyboardInterrupt:
    stop.set()
    thread.join()
    if "error" not in outcome:
      raise
    raise outcome["error"] from None
  if "error" in outcome:
    raise outcome["error"]
  return outcome["state"]
