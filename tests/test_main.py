"""End-to-end runs of ``main.py``: smoke config, NaN stop, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import assert_same_checkpoint
from mlimages_jax import fileio
from mlimages_jax.checkpoints import store
from mlimages_jax.train import loop
from mlimages_jax.train import schedule as schedule_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import pretrain  # noqa: E402

SYNTHETIC_CLASSES = 45


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
  """Subprocess environment: 2 CPU devices (and conftest's compilation cache:
  runs after the first reuse its executables, like a restarted job would)."""
  return dict(
      os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
      TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("tfds")


def _command(workdir: pathlib.Path, data_dir: pathlib.Path,
             *overrides: str) -> list[str]:
  return [sys.executable, str(REPO / "main.py"),
          f"--config={REPO / 'configs' / 'pretrain.py'}:smoke",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}", *overrides]


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run(command, env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def _lines(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("override, error", [
    ("--config.model.dept=50", "error: unknown field config.model.dept (did "
     "you mean config.model.depth?)"),
    ("--workdir={tmp_path}/run.txt", "error: workdir {tmp_path}/run.txt is a "
     "file, not a folder"),
    ("--workdir={tmp_path}/held", "error: workdir {tmp_path}/held is in use by "
     "another run (process {pid} on {host}): wait for it to end or stop it "
     "first"),
])
def test_user_errors_are_one_line(tmp_path, env, override, error):
  """A typo in an override (ml_collections raises it while the flags are
  parsed), a workdir that is a file and one that another run holds (here
  this process): the line, no traceback, exit 1."""
  (tmp_path / "run.txt").write_text("")
  (tmp_path / "held").mkdir()
  override, error = (text.format(tmp_path=tmp_path, pid=os.getpid(),
                                 host=socket.gethostname())
                     for text in (override, error))
  with fileio.exclusive_use(tmp_path / "held", "workdir"):
    result = _run(_command(tmp_path / "work", tmp_path, override), env)
  assert result.returncode == 1, result.stderr[-3000:]
  assert error in result.stderr.splitlines()
  assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir, env) -> pathlib.Path:
  """The smoke config through main.py; it also builds ml_images/synthetic."""
  workdir = tmp_path_factory.mktemp("smoke")
  result = _run(_command(workdir, data_dir), env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_smoke_run_writes_logs_and_checkpoints(smoke_run):
  config = pretrain.get_config("smoke")
  lines = _lines(smoke_run)
  train_lines = [l for l in lines if "loss" in l]
  eval_lines = [l for l in lines if "mAP" in l]
  assert [l["step"] for l in train_lines] == [2, 3, 4, 6]
  for line in train_lines:
    assert set(line) == {"step", "loss", "learning_rate", "images_per_sec",
                         "decode_failures", "input_wait_share",
                         "device_wait_share"}
    assert line["decode_failures"] == 0
    assert 0 <= line["input_wait_share"] + line["device_wait_share"] <= 1
    assert np.isfinite(line["loss"]) and line["images_per_sec"] > 0
    assert line["learning_rate"] == pytest.approx(
        float(schedule_lib.create_learning_rate_fn(config)(line["step"] - 1)))
  assert len(eval_lines) == 1 and eval_lines[0]["step"] == 6
  assert eval_lines[0]["split"] == "validation"
  assert 0.0 < eval_lines[0]["mAP"] <= 1.0
  saved = json.loads((smoke_run / "config.json").read_text())
  assert saved["model"]["depth"] == 14 and saved["batch_size"] == 16
  assert list(smoke_run.glob("events.out.tfevents.*"))
  assert not list(smoke_run.rglob("*.xplane.pb"))  # config.profile is off.
  steps = sorted(int(p.name) for p in (smoke_run / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [3, 6]
  variables, metadata = store.load_for_inference(smoke_run)
  assert metadata["step"] == 6 and metadata["image_size"] == 32
  assert metadata["model"] == {"depth": 14, "num_classes": SYNTHETIC_CLASSES,
                               "width_multiplier": 0.125}
  assert len(metadata["classes"]["ids"]) == SYNTHETIC_CLASSES
  assert variables["params"]["logits"]["kernel"].shape[-1] == SYNTHETIC_CLASSES


@pytest.mark.slow
def test_in_loop_evaluation_equals_mlimages_evaluate(smoke_run, data_dir, env,
                                                    tmp_path):
  """The loop's evaluation at step 6 and ``mlimages evaluate`` of the step-6
  checkpoint (same devices, batch and examples) run one code path on the same
  weights and images, so every number agrees exactly, per class included;
  only the checkpoint's name and the timings may differ."""
  in_loop = json.loads(
      (smoke_run / "eval" / "6" / "eval_results.json").read_text())
  command = [sys.executable, "-m", "mlimages_jax", "evaluate",
             "--checkpoint", str(smoke_run / "checkpoints" / "6"),
             "--dataset", "ml_images/synthetic", "--data-dir", str(data_dir),
             "--image-size", "32", "--batch-size", "64",
             "--num-examples", "128", "--workdir", str(tmp_path),
             "--no-progress"]
  result = _run(command, env)
  assert result.returncode == 0, result.stderr[-3000:]
  tool = json.loads((tmp_path / "eval_results.json").read_text())

  def comparable(results):
    return {**results, "checkpoint": None, "results": {
        size: {k: v for k, v in r.items()
               if k not in ("seconds", "images_per_second")}
        for size, r in results["results"].items()}}

  assert comparable(in_loop) == comparable(tool)
  assert tool["step"] == 6 and tool["results"]["32"]["num_examples"] == 128
  eval_line = [l for l in _lines(smoke_run) if "mAP" in l][-1]
  assert eval_line["mAP"] == tool["results"]["32"]["map"]
  assert eval_line["seconds"] > 0  # The evaluation's duration is logged.


@pytest.mark.slow
def test_incompatible_checkpoint_fails_before_compiling(smoke_run, data_dir,
                                                       monkeypatch):
  config = pretrain.get_config("smoke")
  config.data_dir = str(data_dir)
  config.model.depth = 26

  def compile_step(*args, **kwargs):
    raise AssertionError(f"compiled the step ({args}, {kwargs})")
  monkeypatch.setattr(loop.steps, "pmap_train_step", compile_step)
  with pytest.raises(store.CheckpointError,
                     match=r"incompatible run: model\.depth: checkpoint 14, "
                     r"config 26"):
    loop.train_and_evaluate(config, smoke_run)


@pytest.mark.slow
def test_nan_stops_with_a_message(tmp_path, data_dir, env, smoke_run):
  result = _run(_command(tmp_path, data_dir, "--config.schedule.base_lr=1e30",
                         "--config.num_train_steps=10"), env)
  assert result.returncode == 1
  assert "error: Training stopped: the loss or the gradients became NaN/Inf" \
      in result.stderr
  assert "That update was not applied" in result.stderr
  if (tmp_path / "metrics.jsonl").exists():
    assert not [l for l in _lines(tmp_path) if "mAP" in l]
  assert not (tmp_path / "checkpoints" / "10").exists()


def _state_tree(workdir: pathlib.Path, step: int):
  return ocp.StandardCheckpointer().restore(
      workdir / "checkpoints" / str(step) / "state")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, data_dir, env,
                                                      smoke_run):
  overrides = ("--config.num_train_steps=80",
               "--config.checkpoint_every_steps=10",
               "--config.log_every_steps=10", "--config.keep_checkpoints=20",
               "--config.schedule.decay_boundaries=(60,)")
  reference = tmp_path / "reference"
  result = _run(_command(reference, data_dir, *overrides), env)
  assert result.returncode == 0, result.stderr[-3000:]

  resumed = tmp_path / "resumed"
  process = subprocess.Popen(_command(resumed, data_dir, *overrides), env=env,
                             cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  first = resumed / "checkpoints" / "10"
  while not first.exists():
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  done = [int(p.name) for p in (resumed / "checkpoints").iterdir()
          if p.name.isdigit()]
  assert max(done) < 80, "killed too late to test resumption"

  result = _run(_command(resumed, data_dir, *overrides), env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from step {max(done)} of 80" in result.stderr
  assert_same_checkpoint(reference, resumed, 80)
  # Logged once per step: the lines past the restored step were replaced.
  def summary(workdir):
    return [(l["step"], l.get("loss"), l.get("mAP")) for l in _lines(workdir)]
  assert summary(resumed) == summary(reference)


def _signal_when(command: list[str], env: dict[str, str], trigger: str,
                 signum: int = signal.SIGTERM) -> tuple[int, str]:
  """Runs `command`, sends `signum` once a log line contains `trigger`;
  returns the exit code and the log. (The seconds from the signal to the
  exit: benchmarks/stop_bench.py.)"""
  process = subprocess.Popen(command, env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  lines, sent = [], None
  for line in process.stderr:
    lines.append(line)
    if sent is None and trigger in line:
      process.send_signal(signum)
      sent = True
  process.wait(timeout=600)
  assert sent, "".join(lines)[-3000:]
  return process.returncode, "".join(lines)


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit())


@pytest.mark.slow
def test_signals_save_the_next_step_and_resume_exactly(tmp_path, data_dir,
                                                       env, smoke_run):
  """SIGTERM during an evaluation, then SIGINT during a checkpoint save: each
  run saves the first step boundary after its signal, exits with 75 within
  seconds, and the same command resumes to the state of an uninterrupted
  run (the smoke run's step 6: the schedule does not depend on the length)."""
  workdir = tmp_path / "preempted"
  command = _command(workdir, data_dir, "--config.num_train_steps=8",
                     "--config.eval_every_steps=2",
                     "--config.checkpoint_every_steps=2")

  # The evaluation at step 2 runs after step 2's boundary: step 3 is saved.
  code, log = _signal_when(command, env, "step 2: evaluating")
  assert code == 75, log[-3000:]
  assert "SIGTERM received after the boundary of step 2;" in log
  assert "Preempted: stopped at step 3" in log
  # The saved steps catch a late stop (the wait's timeout a hang).
  assert _checkpoint_steps(workdir) == [2, 3]
  evaluations = [l["step"] for l in _lines(workdir) if "mAP" in l]
  assert evaluations == [2]  # The interrupted evaluation completed.

  # Step 4 is an evaluation step: its checkpoint is handed to Orbax after
  # step 4's boundary, before the evaluation; the signal lands during that
  # save, the evaluation or just after, and the run stops at the boundary
  # after it (5 or 6).
  code, log = _signal_when(command, env, "step 4: saving", signal.SIGINT)
  assert code == 75, log[-3000:]
  assert "Resumed from step 3 of 8" in log
  passed = int(log.split("SIGINT received after the boundary of step ")[1]
               .split(";")[0])
  stopped = int(log.split("Preempted: stopped at step ")[1].split()[0])
  assert passed in (4, 5) and stopped == passed + 1
  assert _checkpoint_steps(workdir)[-2:] == [4, stopped]

  result = _run(command, env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from step {stopped} of 8" in result.stderr
  assert_same_checkpoint(smoke_run, workdir, 6)
  # Every evaluation once (a stop at an evaluation step evaluates first);
  # training lines also at the two stops.
  lines = _lines(workdir)
  assert [l["step"] for l in lines if "mAP" in l] == [2, 4, 6, 8]
  assert [l["step"] for l in lines if "loss" in l] == sorted(
      {2, 4, 6, 8, 3, stopped})


# The smoke model's largest array file is ~530 KB, everything else a run
# writes (logs, metadata, the other array files) stays below 110 KB.
FILE_SIZE_LIMIT = 250_000


def _limit_file_size() -> None:
  resource.setrlimit(resource.RLIMIT_FSIZE,
                     (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_older_checkpoints(tmp_path, data_dir,
                                                         env, smoke_run):
  """A save that cannot be written (here: a file size limit, as a full disk
  or a quota fails the write; no root needed) stops the run with a clear
  error; checkpoint 3 stays intact and the same command resumes from it
  once writes succeed, ending where an uninterrupted run ends."""
  # The smoke run as it stood after step 3 (its checkpoint, its log).
  workdir = tmp_path / "work"
  shutil.copytree(smoke_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  full = subprocess.run(_command(workdir, data_dir), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        preexec_fn=_limit_file_size)
  assert full.returncode == 1, full.stderr[-3000:]
  assert (f"error: Could not write checkpoint step 6 to "
          f"{workdir / 'checkpoints'}: ") in full.stderr
  assert "File too large" in full.stderr
  assert ("Older checkpoints are intact (steps [3]); once there is space (or "
          "the workdir is writable) the same command resumes from step 3."
          ) in full.stderr
  assert _checkpoint_steps(workdir) == [3]
  _state_tree(workdir, 3)  # Restores.

  result = _run(_command(workdir, data_dir), env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from step 3 of 6" in result.stderr
  assert "the save never finished" in result.stderr
  assert [p.name for p in (workdir / "checkpoints_bad").iterdir()] == [
      "6-unfinished-save"]
  assert_same_checkpoint(smoke_run, workdir, 6)
