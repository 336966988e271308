"""Tests of mlimages_jax.train.background (a notebook's training thread)."""

from __future__ import annotations

import json
import threading

import pytest

import loop_helpers
from mlimages_jax.inputs import pipeline
from mlimages_jax.train import background
from mlimages_jax.train import evaluator as train_evaluator
from mlimages_jax.train import preemption


def _interrupt() -> None:
  raise KeyboardInterrupt  # What the notebook's stop button raises.


def test_an_interrupt_stops_the_run_with_its_checkpoint(shapes_dir, tmp_path,
                                                        monkeypatch):
  """An interrupted cell stops the training thread too (a plain thread kept
  training inside the kernel, and the cell's rerun was a second run into
  the same workdir); the step it stopped at is saved and the rerun resumes
  from it. (The stand-in step leaves the state's step counter alone: the
  loop's step is read from what it wrote.)"""
  loop_helpers.use_instant_steps(monkeypatch)
  # The final evaluation reads the checkpoint as a ResNet: not this model.
  monkeypatch.setattr(train_evaluator.Evaluator, "run",
                      lambda self, state, image_size, step: {"mAP": 0.5})
  config = loop_helpers.shapes_config(shapes_dir)
  config.num_train_steps = config.checkpoint_every_steps = 1000
  config.log_every_steps, config.eval_every_steps = 1, 0
  workdir = tmp_path / "work"
  try:
    background.train(config, workdir, _interrupt, poll_seconds=0)
    pytest.fail("the run was not stopped")
  except KeyboardInterrupt:
    pytest.fail("the interrupt ended the cell but not the run")
  except preemption.Preempted as e:
    assert "checkpoint is complete" in str(e)
    step = e.step
  assert 1 <= step < 1000
  assert "mlimages-train" not in [t.name for t in threading.enumerate()]
  assert [p.name for p in (workdir / "checkpoints").iterdir()
          if p.name.isdigit()] == [str(step)]

  config.num_train_steps = step + 2
  polls = []
  background.train(config, workdir, lambda: polls.append(1),
                   poll_seconds=0.05)
  assert polls and (workdir / "checkpoints" / str(step + 2)).is_dir()
  logged = [json.loads(line)["step"] for line in
            (workdir / "metrics.jsonl").read_text().splitlines()]
  assert logged == [*range(1, step + 3), step + 2]  # The last: evaluation.


def test_a_failing_run_raises_in_the_callers_thread(tmp_path):
  config = loop_helpers.shapes_config(str(tmp_path / "no_data"))
  with pytest.raises(pipeline.DatasetNotBuiltError, match="tfds build"):
    background.train(config, tmp_path / "work", lambda: None,
                     poll_seconds=0.01)
