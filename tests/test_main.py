"""End-to-end runs of ``main.py``: smoke config, NaN stop, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlimages_jax.checkpoints import store
from mlimages_jax.train import loop
from mlimages_jax.train import schedule as schedule_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import pretrain  # noqa: E402

SYNTHETIC_CLASSES = 45


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
  """Subprocess environment: 2 CPU devices and a shared compilation cache
  (runs after the first reuse its executables, like a restarted job would)."""
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(
      os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
      TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


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
                         "decode_failures"}
    assert line["decode_failures"] == 0
    assert np.isfinite(line["loss"]) and line["images_per_sec"] > 0
    assert line["learning_rate"] == pytest.approx(
        float(schedule_lib.create_learning_rate_fn(config)(line["step"] - 1)))
  assert len(eval_lines) == 1 and eval_lines[0]["step"] == 6
  assert eval_lines[0]["split"] == "validation"
  assert 0.0 < eval_lines[0]["mAP"] <= 1.0
  saved = json.loads((smoke_run / "config.json").read_text())
  assert saved["model"]["depth"] == 14 and saved["batch_size"] == 16
  assert list(smoke_run.glob("events.out.tfevents.*"))
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
def test_incompatible_checkpoint_fails_before_compiling(smoke_run, data_dir):
  config = pretrain.get_config("smoke")
  config.data_dir = str(data_dir)
  config.model.depth = 26
  start = time.perf_counter()
  with pytest.raises(store.CheckpointError,
                     match=r"incompatible run: model\.depth: checkpoint 14, "
                     r"config 26"):
    loop.train_and_evaluate(config, smoke_run)
  assert time.perf_counter() - start < 30


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
  want, got = _state_tree(reference, 80), _state_tree(resumed, 80)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  # Logged once per step: the lines past the restored step were replaced.
  def summary(workdir):
    return [(l["step"], l.get("loss"), l.get("mAP")) for l in _lines(workdir)]
  assert summary(resumed) == summary(reference)
