"""Tests of mlimages_jax.train.loop (runs through main.py: test_main.py)."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import sys
import threading
import time

import jax
import numpy as np
import pytest

import loop_helpers
from mlimages_jax import fileio
from mlimages_jax.checkpoints import store
from mlimages_jax.evaluation import evaluator as evaluation
from mlimages_jax.inputs import pipeline
from mlimages_jax.train import config_validation
from mlimages_jax.train import evaluator as train_evaluator
from mlimages_jax.train import inputs
from mlimages_jax.train import loop
from mlimages_jax.train import steps

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402


def _fail(what: str):
  def fail(*args, **kwargs):
    raise AssertionError(f"{what} (args {args}, {kwargs})")
  return fail


def test_missing_dataset_fails_fast_with_build_command(tmp_path, monkeypatch):
  """Before the model is even built (so before anything compiles)."""
  config = pretrain.get_config()  # The full recipe: ml_images/full.
  config.data_dir = str(tmp_path)
  monkeypatch.setattr(loop, "create_model",
                      _fail("built the model before reading the dataset"))
  with pytest.raises(pipeline.DatasetNotBuiltError,
                     match=r"tfds build ml_images --imports=mlimages_jax\."
                           r"datasets\.ml_images --config=full"):
    loop.train_and_evaluate(config, tmp_path / "work")
  assert not (tmp_path / "work" / "checkpoints").exists()


# Sleeps that make a phase of `traced_run` input- or device-bound.
SLOW_SECONDS = 0.5


class _SlowInput:
  """An input iterator whose first `slow` batches each take SLOW_SECONDS."""

  def __init__(self, iterator: pipeline.InputIterator, slow: int):
    self.iterator, self.slow = iterator, slow

  def __next__(self):
    if self.slow:
      self.slow -= 1
      time.sleep(SLOW_SECONDS)
    return next(self.iterator)

  def __getattr__(self, name: str):
    return getattr(self.iterator, name)


class _SlowDevice:
  """Wraps `steps.pmap_train_step`: from step `slow_from` on, each step's
  metrics pass a host callback on device 0 that waits until the host has
  queued the next step (the loop queues step N + 1 before it waits for step
  N) and then sleeps SLOW_SECONDS, so the metrics the loop waits on are late
  and, however loaded the machine, step N is still in flight when N + 1 is
  queued; records the most steps ever dispatched and not done (metrics not
  ready) just after a dispatch."""

  def __init__(self, slow_from: int, last_step: int):
    self.slow_from, self.last_step = slow_from, last_step
    self.dispatched, self.max_in_flight = 0, 0
    self.callbacks, self.done = collections.Counter(), 0
    self.queued = threading.Condition()
    self.gate = jax.pmap(self._gate, axis_name="i")

  def _finish(self, step, device):
    if step >= self.slow_from and device == 0:
      with self.queued:  # A timeout, not a hang, if the loop never queues.
        self.queued.wait_for(
            lambda: self.dispatched >= min(step + 1, self.last_step),
            timeout=120)
      time.sleep(SLOW_SECONDS)
    self.callbacks[int(step)] += 1
    if self.callbacks[int(step)] == jax.local_device_count():
      self.done += 1
    return np.float32(0)

  def _gate(self, metrics, step):
    zero = jax.pure_callback(self._finish, jax.ShapeDtypeStruct((), "float32"),
                             step, jax.lax.axis_index("i"))
    return {k: v + zero.astype(v.dtype) for k, v in metrics.items()}

  def wrap(self, make_step):
    def make(*args, **kwargs):
      p_step = make_step(*args, **kwargs)

      def step(state, batch):
        with self.queued:
          self.dispatched += 1
          self.max_in_flight = max(self.max_in_flight,
                                   self.dispatched - self.done)
          self.queued.notify_all()
        state, metrics = p_step(state, batch)
        return state, self.gate(
            metrics, np.full(jax.local_device_count(), self.dispatched))
      return step
    return make


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
  """8 steps in process on a tiny real build with the annotations as given,
  stored as array_record (training reads it by index; the checkpoint holds
  that iterator's position), 2 micro-batches, positivity groups of 4, with `config.profile` tracing
  steps 7-8: the first logging interval (steps 1-4) input-bound, the second
  (5-8) device-bound. Returns the workdir and the `_SlowDevice` record."""
  from mlimages_jax.datasets.ml_images import ml_images_dataset_builder as mib
  tmp_path = tmp_path_factory.mktemp("traced_run")
  config_name = "synthetic_as_given"
  mib.Builder(config=mib.MlImagesConfig(
      name=config_name, kind="synthetic", parts=(), num_train=32,
      num_validation=16, image_size=32, label_closure="as_given"),
              data_dir=str(tmp_path / "data"),
              file_format="array_record").download_and_prepare()
  config = pretrain.get_config("smoke")
  config.dataset = f"ml_images/{config_name}"
  config.data_dir = str(tmp_path / "data")
  config.num_train_steps = 8
  config.log_every_steps = 4
  config.checkpoint_every_steps = 8
  config.eval_batch_size = 8
  config.num_eval_examples = -1
  config.accumulate_steps = 2
  config.loss.positivity_batch_size = 4
  config.profile.after_steps, config.profile.num_steps = 6, 2
  device = _SlowDevice(slow_from=5, last_step=config.num_train_steps)
  with pytest.MonkeyPatch.context() as patch:
    create = inputs.create_train_iterator
    patch.setattr(inputs, "create_train_iterator",
                  lambda *a, **k: _SlowInput(create(*a, **k), slow=4))
    patch.setattr(steps, "pmap_train_step", device.wrap(steps.pmap_train_step))
    loop.train_and_evaluate(config, tmp_path / "work")
  return tmp_path / "work", device


@pytest.mark.slow
def test_checkpoints_record_the_datasets_label_closure(traced_run):
  """A real build with the annotations as given: every checkpoint says so."""
  checkpoints = store.TrainCheckpointer(traced_run[0])
  metadata = checkpoints.metadata(checkpoints.latest_step())
  checkpoints.close()
  assert metadata["step"] == 8
  assert metadata["label_closure"] == "as_given"
  [position] = traced_run[0].glob("**/8/**/process_0-of-1.bin")
  position = json.loads(position.read_bytes())
  assert position["file_format"] == "array_record"
  # 8 steps of 16 over 32 examples: the 4th epoch (index 3) read to its end.
  assert (position["epoch"], position["position"]) == (3, 32)



@pytest.mark.slow
def test_wait_shares_show_the_bottleneck(traced_run):
  """The input-bound interval waits mostly on the input, the device-bound
  one mostly on the devices."""
  lines = [json.loads(line) for line in
           (traced_run[0] / "metrics.jsonl").read_text().splitlines()]
  first, second = [line for line in lines if "loss" in line]
  assert (first["step"], second["step"]) == (4, 8)
  for line in (first, second):
    assert 0 <= line["input_wait_share"] <= 1
    assert 0 <= line["device_wait_share"] <= 1
  assert first["input_wait_share"] > first["device_wait_share"]
  assert second["device_wait_share"] > second["input_wait_share"]


@pytest.mark.slow
def test_the_host_queues_at_most_two_steps(traced_run):
  """On a slow device the host waits for step N - 2 before queueing step N
  (unbounded, it queued the interval's steps: 3 or more, measured)."""
  assert traced_run[1].dispatched == 8
  assert traced_run[1].max_in_flight == 2


@pytest.mark.slow
def test_profile_writes_a_trace_for_tensorboard(traced_run):
  traces = list((traced_run[0] / "profile" / "plugins" / "profile").glob(
      "*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_missing_eval_split_fails_before_building_anything(shapes_dir,
                                                          tmp_path,
                                                          monkeypatch):
  """The split the run evaluates on is checked with the others, up front:
  not at the first evaluation, after compiling and training."""
  monkeypatch.setattr(steps, "pmap_train_step",
                      _fail("built the train step"))
  monkeypatch.setattr(loop, "create_train_state",
                      _fail("built the train state"))
  config = loop_helpers.shapes_config(shapes_dir)
  config.eval_split = "validation"
  with pytest.raises(config_validation.ConfigError,
                     match=r"config\.eval_split 'validation': synth_shapes/"
                     r"1\.0\.0 has no such split \(splits: test, train\); "
                     r"set --config\.eval_split=test"):
    loop.train_and_evaluate(config, tmp_path / "work")
  assert not (tmp_path / "work" / "checkpoints").exists()


def test_failing_evaluation_keeps_the_steps_checkpoint(shapes_dir, tmp_path,
                                                       monkeypatch):
  """Step 1 is a checkpoint and an evaluation step; the evaluation fails.
  The checkpoint was handed to Orbax before the evaluation, and is written
  (the run waits for it) before the error reaches the caller."""
  loop_helpers.use_instant_steps(monkeypatch)

  def failing_evaluation(self, state, image_size, step):
    raise evaluation.EvaluationError(f"evaluation of step {step} failed")

  monkeypatch.setattr(train_evaluator.Evaluator, "run", failing_evaluation)
  config = loop_helpers.shapes_config(shapes_dir)
  config.num_train_steps = 3
  config.checkpoint_every_steps = config.eval_every_steps = 1
  with pytest.raises(evaluation.EvaluationError,
                     match="evaluation of step 1 failed"):
    loop.train_and_evaluate(config, tmp_path / "work")
  checkpoints = store.TrainCheckpointer(tmp_path / "work")
  assert checkpoints.latest_step() == 1
  assert checkpoints.metadata(1)["label_mode"] == "single"
  checkpoints.close()


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_workdir_that_cannot_be_a_folder_fails_first(tmp_path, where):
  a_file = tmp_path / "run"
  a_file.write_text("")
  workdir = a_file if where == "file" else a_file / "sub"
  reason = ("is a file, not a folder" if where == "file"
            else r"cannot be written \(Not a directory\)")
  with pytest.raises(fileio.OutputPathError,
                     match=f"workdir {workdir} {reason}"):
    loop.train_and_evaluate(pretrain.get_config(), workdir)



def test_a_second_run_into_a_held_workdir_stops_at_once(shapes_dir, tmp_path,
                                                        monkeypatch):
  """Two runs into one workdir would interleave checkpoints and rewrite each
  other's metrics.jsonl (a resumed run truncates it): the second stops
  before touching anything, naming the run that holds the folder."""
  monkeypatch.setattr(loop, "create_train_state",
                      _fail("built the train state"))
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
  with fileio.exclusive_use(workdir, "workdir"):
    with pytest.raises(fileio.FolderInUseError,
                       match=rf"workdir {workdir} is in use by another run "
                             rf"\(process {os.getpid()} on "):
      loop.train_and_evaluate(loop_helpers.shapes_config(shapes_dir),
                              workdir)
  assert (workdir / "metrics.jsonl").read_text() == (
      '{"step": 4, "loss": 1.0}\n')
  assert sorted(p.name for p in workdir.iterdir()) == [".lock",
                                                       "metrics.jsonl"]
