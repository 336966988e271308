"""A training run, its resumption and the tools on ``gs://``, for real.

Everything goes to a GCS emulator on 127.0.0.1 (`remote_helpers.gcs_emulator`)
through the clients a real run uses: Orbax's arrays through TensorStore; its
metadata, our logs and results (epath), TFDS and TensorBoard through
tf.io.gfile. Only the endpoint differs from Google's.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from etils import epath
import numpy as np
from PIL import Image
import pytest

from conftest import assert_same_checkpoint
import remote_helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = f"gs://{remote_helpers.GCS_BUCKET}/run"
DATA_DIR = f"gs://{remote_helpers.GCS_BUCKET}/tfds"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
  """The emulator for the module; its variables here and in subprocesses
  (2 CPU devices and a compilation cache, as in tests/test_main.py)."""
  directory = tmp_path_factory.mktemp("gcs")
  with remote_helpers.gcs_emulator(str(directory)) as emulator_env:
    with pytest.MonkeyPatch.context() as monkeypatch:
      for name, value in emulator_env.items():
        monkeypatch.setenv(name, value)
      yield dict(
          os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
          TF_CPP_MIN_LOG_LEVEL="2")


def _run(command: list[str], env: dict[str, str]) -> str:
  """Runs `command`; returns its log (stderr), failing the test on an error."""
  result = subprocess.run(command, env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


def _train(workdir: str, env: dict[str, str], *overrides: str) -> str:
  return _run([sys.executable, str(REPO / "main.py"),
               f"--config={REPO / 'configs' / 'pretrain.py'}:smoke",
               f"--workdir={workdir}", f"--config.data_dir={DATA_DIR}",
               *overrides], env)


@pytest.fixture(scope="module")
def gcs_run(env, tmp_path_factory) -> tuple[str, pathlib.Path]:
  """The smoke run (6 steps) on gs://, stopped after step 3 then resumed by
  the same command with the full length; and the same run on local disk.
  (The smoke schedule does not depend on the length: see test_main.)"""
  _train(RUN, env, "--config.num_train_steps=3")
  log = _train(RUN, env)
  assert "Resumed from step 3 of 6" in log
  local = tmp_path_factory.mktemp("local")
  _train(str(local), env)
  return RUN, local


@pytest.mark.slow
def test_resumed_gcs_run_equals_local_run(gcs_run):
  """Checkpoints written to and restored from GCS lose nothing: the resumed
  run ends bit-identical to the uninterrupted local one (same devices)."""
  run, local = gcs_run
  assert_same_checkpoint(local, run, 6)
  workdir = epath.Path(run)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
      "3", "6"]
  lines = [json.loads(l) for l in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  local_lines = [json.loads(l) for l in
                 (local / "metrics.jsonl").read_text().splitlines()]
  # The training lines; the first run also evaluated at its end (step 3).
  assert ([(l["step"], l["loss"]) for l in lines if "loss" in l]
          == [(l["step"], l["loss"]) for l in local_lines if "loss" in l])
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16
  assert any(p.name.startswith("events.out.tfevents")
             for p in workdir.iterdir())  # TensorBoard, through tf.io.gfile.


@pytest.mark.slow
def test_evaluate_and_init_checkpoint_from_gcs(gcs_run, env):
  """`mlimages evaluate --checkpoint gs://...` writing to gs:// equals the
  run's own evaluation; `init_checkpoint` reads the gs:// workdir."""
  run, _ = gcs_run
  out = f"gs://{remote_helpers.GCS_BUCKET}/evaluate"
  log = _run([sys.executable, "-m", "mlimages_jax", "evaluate",
              "--checkpoint", run, "--dataset", "ml_images/synthetic",
              "--data-dir", DATA_DIR, "--image-size", "32",
              "--batch-size", "64", "--num-examples", "128",
              "--workdir", out, "--no-progress"], env)
  tool = json.loads((epath.Path(out) / "eval_results.json").read_text())
  in_loop = json.loads(
      (epath.Path(run) / "eval" / "6" / "eval_results.json").read_text())
  assert tool["step"] == 6, log[-3000:]
  assert (tool["results"]["32"]["map"] == in_loop["results"]["32"]["map"])

  log = _train(f"gs://{remote_helpers.GCS_BUCKET}/finetuned", env,
               f"--config.init_checkpoint={run}",
               "--config.num_train_steps=1")
  assert f"config.init_checkpoint: step 6 of {run}" in log


@pytest.mark.slow
def test_classify_from_gcs_equals_local(gcs_run, env, tmp_path):
  """`mlimages classify --checkpoint gs://... --out gs://...` reads the
  checkpoint and writes its predictions on GCS; they equal those of the
  bit-identical local checkpoint (exact: same program, same weights)."""
  run, local = gcs_run
  image = tmp_path / "image.png"
  Image.fromarray(np.random.default_rng(0).integers(
      0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
  outputs = {}
  for checkpoint, out in ((run, f"gs://{remote_helpers.GCS_BUCKET}/top.tsv"),
                          (str(local), str(tmp_path / "top.tsv"))):
    _run([sys.executable, "-m", "mlimages_jax", "classify", str(image),
          "--checkpoint", checkpoint, "--top-k", "3", "--preprocess", "eval",
          "--out", out, "--no-progress"], env)
    outputs[checkpoint] = epath.Path(out).read_text()
  assert outputs[run] == outputs[str(local)]
  assert len(outputs[run].splitlines()) >= 3
