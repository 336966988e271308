"""Real multi-process JAX: 2 processes x 2 CPU devices (gloo).

`test_two_processes_match_one_process` trains 3 pmapped steps on the same
global batch (process i feeds the devices 2i and 2i+1), so gradients, BN
statistics and the adaptive loss's class counters must be reduced across
processes to agree with one process with 4 devices: the floats after the
first step, the counters after all 3; and not with what one process's own
devices give. The multi-process run also writes a checkpoint together
(per-process input states) and restores it.
`test_main_two_processes_train_evaluate_and_resume` runs ``main.py`` itself as
two processes on the synthetic TFDS dataset.

This file is also the worker: ``python test_multihost.py OUT PROCESS_ID
NUM_PROCESSES PORT LOCAL_DEVICES``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_same_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import pretrain  # noqa: E402  pylint: disable=g-import-not-at-top

GLOBAL_DEVICES = 4
# Conditioning decides how far two float32 runs drift apart: with 2 noise
# images of 32x32 per device the last BN normalises 2 values per channel and
# 3 steps blew last-bit differences up to 0.4; 8 images of 64x64 per device
# (32 values per channel in the last stage) keep the drift near the rounding
# level (see TOLERANCE).
PER_DEVICE = 8
IMAGE_SIZE = 64
NUM_CLASSES = 16
STEPS = 3
MASK_THRES = 0.7  # The smoke config's loss.mask_thres.
SYNTHETIC_CLASSES = 45  # Of ml_images/synthetic (the main.py test).


def global_batch(step: int) -> dict[str, np.ndarray]:
  """Noise images; long-tailed labels (class c positive w.p. 0.5 * 0.75**c,
  ~5% ignored), so rare classes are positive on one process's half only."""
  rng = np.random.default_rng(step)
  shape = (GLOBAL_DEVICES, PER_DEVICE)
  image = rng.integers(0, 256, (*shape, IMAGE_SIZE, IMAGE_SIZE, 3),
                       dtype=np.uint8)
  draws = rng.random((*shape, NUM_CLASSES))
  rates = 0.5 * 0.75 ** np.arange(NUM_CLASSES)
  return {
      "image": image,
      "labels": np.where(draws < rates, 1.0,
                         np.where(draws > 0.95, -1.0, 0.0)).astype(np.float32),
      "mask": np.ones(shape, np.float32)}


def worker(out: pathlib.Path,
           process_id: int,
           num_processes: int,
           port: int,
           local_devices: int) -> None:
  """Trains STEPS steps, its devices fed the global batch's device shards
  from ``process_id * local_devices`` on; process 0 saves the state after
  the first step with its loss (first.npz) and the final one (final.npz).
  With 1 process and 2 devices it computes what process 0 of 2 computes when
  it reduces over its own devices only."""
  import jax  # pylint: disable=g-import-not-at-top

  # pylint: disable=g-import-not-at-top
  from mlimages_jax.checkpoints import store
  from mlimages_jax.train import config_validation
  from mlimages_jax.train import distributed
  from mlimages_jax.train import optimizer as optimizer_lib
  from mlimages_jax.train import schedule as schedule_lib
  from mlimages_jax.train import state as state_lib
  from mlimages_jax.train import steps as steps_lib

  if num_processes > 1:
    distributed.initialize_distributed(f"127.0.0.1:{port}", num_processes,
                                       process_id)
  assert jax.device_count() == local_devices * num_processes
  assert jax.local_device_count() == local_devices
  config = pretrain.get_config("smoke")  # Its schedule, batch-scaled.
  config.batch_size = GLOBAL_DEVICES * PER_DEVICE
  config.loss.neg_select = 0.5  # Exercise the (shared) negative sampling.
  # The decay from step 2 on, so that the 3 steps span warm-up and decay.
  config.schedule.rate_at_boundary = "decayed"
  assert config.loss.mask_thres == MASK_THRES
  config_validation.validate_config(config)
  model = state_lib.create_model(config, NUM_CLASSES)
  learning_rate_fn = schedule_lib.create_learning_rate_fn(config)
  tx = optimizer_lib.create_optimizer(config, learning_rate_fn)
  state = state_lib.create_train_state(jax.random.PRNGKey(0), model, IMAGE_SIZE,
                                       tx)
  step = steps_lib.pmap_train_step(
      model, tx, config, optimizer_lib.batch_norm_modules(state.batch_stats))
  replicated = distributed.replicate(state)
  first = jax.process_index() * local_devices
  saved = {}
  for i in range(STEPS):
    batch = {k: v[first:first + local_devices]
             for k, v in global_batch(i).items()}
    replicated, metrics = step(replicated, batch)
    if i == 0:
      saved["first"] = (distributed.unreplicate(replicated),
                        {"loss": distributed.unreplicate(metrics)["loss"]})
  final = distributed.unreplicate(replicated)
  saved["final"] = (final, {"learning_rates": np.asarray(
      [learning_rate_fn(i) for i in range(STEPS)])})

  if num_processes > 1:
    metadata = store.make_metadata(
        depth=14, num_classes=NUM_CLASSES, width_multiplier=0.125,
        image_size=IMAGE_SIZE, label_mode="multi",
        class_ids=[str(i) for i in range(NUM_CLASSES)],
        class_names=[str(i) for i in range(NUM_CLASSES)])
    checkpointer = store.TrainCheckpointer(out / "work")
    checkpointer.save(STEPS, final, metadata, f"input of {process_id}".encode())
    checkpointer.wait_until_finished()
    restored, position = checkpointer.restore(STEPS, state)
    checkpointer.close()
    assert position == f"input of {process_id}".encode(), position
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(final)):
      np.testing.assert_array_equal(a, b)
  if jax.process_index() == 0:
    for name, (tree, extra) in saved.items():
      np.savez(out / f"{name}.npz", **extra, **{
          jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)})
  if num_processes > 1:
    jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(out: pathlib.Path,
           process_id: int,
           num_processes: int,
           port: int,
           local_devices: int) -> subprocess.Popen:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count="
             f"{local_devices}")
  return subprocess.Popen([
      sys.executable, __file__,
      str(out),
      str(process_id),
      str(num_processes),
      str(port),
      str(local_devices)
  ],
                          env=env,
                          cwd=REPO,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True)


def consecutive_positive_batches() -> np.ndarray:
  """NumPy reference of the loss's pos_count after STEPS global batches."""
  count = np.zeros(NUM_CLASSES, np.float32)
  for i in range(STEPS):
    positive = (global_batch(i)["labels"] >= MASK_THRES).any(axis=(0, 1))
    count = np.where(positive, count + 1, 0)
  return count


# The rounding scale of the comparison. The layouts run the same per-device
# program on the same shard; what differs is the order of float32 sums: the
# cross-device mean (in-process vs gloo) and, on a CPU whose threads split a
# reduction differently, the sums inside a device. The longest sum in one
# step runs over every position of the global batch (a stem kernel's
# gradient: 32 images x 32 x 32 positions after the stride-2 stem), and
# rounding errors of an n-term sum add up like a random walk, to about
# sqrt(n) * eps of the terms' magnitude: sqrt(32768) * eps = 2.2e-5 of a
# leaf's magnitude. Measured after one step: at most 1.5 eps (parameters,
# momentum, BN statistics; the loss 0.7 eps), so 120x below it.
TOLERANCE = float(np.sqrt(GLOBAL_DEVICES * PER_DEVICE * (IMAGE_SIZE // 2)**2)
                  * np.finfo(np.float32).eps)


def relative_drift(run: np.lib.npyio.NpzFile,
                   reference: np.lib.npyio.NpzFile) -> dict[str, float]:
  """Per float leaf of the state after one step (and the loss): the largest
  difference from `reference`, relative to the leaf's magnitude."""
  return {key: float(np.max(np.abs(run[key] - reference[key])))
                / max(float(np.max(np.abs(reference[key]))), 1e-30)
          for key in reference
          if reference[key].dtype.kind == "f" and reference[key].size}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """After one step the whole train state agrees within float32 rounding.

  One step, before chaos: 3 steps at the recipe's learning rates amplify
  last-bit differences by a factor that depends on the CPU (on an AVX-512
  EPYC up to 2.6e-3 of a leaf's scale in the momentum), so the floats are
  compared after the first step (gradients = momentum, BN statistics, the
  loss), within TOLERANCE of each leaf's magnitude; the loss counters, exact
  integers, after all 3. A third run computes what process 0 computes when
  each process reduces over its own 2 devices only (1 process x 2 devices
  on the first half of the batch): it must lie >= 100x outside TOLERANCE in
  every part of the state and in every momentum leaf. Measured: the
  largest 2 x 2 drift 1.5 eps; the planted bug's momentum 5,500x TOLERANCE
  in its closest leaf, the loss 7,100x, BN statistics 28,000x.
  """
  runs = {name: tmp_path / name for name in ("single", "multi", "bug")}
  for path in runs.values():
    path.mkdir()
  port = _free_port()
  processes = [_spawn(runs["single"], 0, 1, 0, GLOBAL_DEVICES),
               _spawn(runs["bug"], 0, 1, 0, GLOBAL_DEVICES // 2)] + [
                   _spawn(runs["multi"], i, 2, port, GLOBAL_DEVICES // 2)
                   for i in range(2)]
  for process in processes:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
  first = {name: np.load(path / "first.npz") for name, path in runs.items()}
  final = {name: np.load(path / "final.npz") for name, path in runs.items()}
  want, got, bug = first["single"], first["multi"], first["bug"]
  assert sorted(want) == sorted(got) == sorted(bug)
  assert int(got[".step"]) == 1 and int(final["multi"][".step"]) == STEPS
  # The smoke schedule at global batch 32 (reference 16, so x2): warm-up
  # 0.02, x1.297, then 0.16 decayed x0.1; the recipe's LR range.
  for run in final.values():
    np.testing.assert_allclose(run["learning_rates"],
                               [0.02, 0.02 * 1.297, 0.016], rtol=1e-6)
  drift, bug_drift = relative_drift(got, want), relative_drift(bug, want)
  assert {"loss", ".params", ".batch_stats", ".opt_state"} <= {
      key.split("[")[0] for key in drift}
  too_far = {key: value / TOLERANCE for key, value in drift.items()
             if value > TOLERANCE}
  assert not too_far, too_far
  for group in ("loss", ".params", ".batch_stats", ".opt_state"):
    assert max(value for key, value in bug_drift.items()
               if key.startswith(group)) >= 100 * TOLERANCE, group
  momentum = [value for key, value in bug_drift.items()
              if key.startswith(".opt_state")]
  assert len(momentum) > 40 and min(momentum) >= 100 * TOLERANCE
  # Counters of the adaptive loss follow the global batch: exactly equal, and
  # equal to the NumPy count; in every step some class is positive on one
  # process's half only, so a per-process positivity changes them.
  expected_pos = consecutive_positive_batches()
  for run in (final["single"], final["multi"]):
    np.testing.assert_array_equal(run[".loss_state.pos_count"], expected_pos)
  np.testing.assert_array_equal(final["multi"][".loss_state.neg_count"],
                                final["single"][".loss_state.neg_count"])
  assert np.any(final["bug"][".loss_state.pos_count"] != expected_pos)
  assert 0 < np.count_nonzero(expected_pos) < NUM_CLASSES
  for i in range(STEPS):
    positive = global_batch(i)["labels"] >= MASK_THRES
    halves = positive[:2].any(axis=(0, 1)), positive[2:].any(axis=(0, 1))
    assert np.any(halves[0] != halves[1])
  # Per-process input states were written by each process.
  step_dir = runs["multi"] / "work" / "checkpoints" / str(STEPS) / (
      "input_iterator")
  assert sorted(p.name for p in step_dir.glob("*.bin")) == [
      "process_0-of-2.bin", "process_1-of-2.bin"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """ml_images/synthetic, built once here (two processes must not race to
  build it)."""
  from mlimages_jax.inputs import pipeline  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("tfds")
  pipeline.load_builder("ml_images/synthetic", str(path),
                              build_if_missing=True)
  return path


def _run_main(workdir: pathlib.Path, data_dir: pathlib.Path, env: dict,
              run: str, *overrides: str) -> list[str]:
  """``main.py`` smoke run as 2 processes x 2 devices; returns their logs."""
  port = _free_port()
  processes, logs = [], []
  for i in range(2):
    logs.append(workdir.parent / f"{run}_process_{i}.log")
    with logs[-1].open("w") as log:
      processes.append(subprocess.Popen(
          [sys.executable, str(REPO / "main.py"),
           f"--config={REPO / 'configs' / 'pretrain.py'}:smoke",
           f"--workdir={workdir}", f"--config.data_dir={data_dir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}", *overrides],
          env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
  for process, log in zip(processes, logs):
    process.wait(timeout=600)
    assert process.returncode == 0, log.read_text()[-4000:]
  return [log.read_text() for log in logs]


def _input_states(workdir: pathlib.Path, step: int) -> list[dict]:
  directory = workdir / "checkpoints" / str(step) / "input_iterator"
  assert sorted(p.name for p in directory.glob("*.bin")) == [
      "process_0-of-2.bin", "process_1-of-2.bin"]
  return [json.loads((directory / f"process_{i}-of-2.bin").read_bytes())
          for i in range(2)]


ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
           XLA_FLAGS="--xla_force_host_platform_device_count=2")


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory, data_dir) -> pathlib.Path:
  """The smoke config trained by ``main.py`` as 2 processes (6 steps)."""
  workdir = tmp_path_factory.mktemp("two_processes") / "work"
  _run_main(workdir, data_dir, ENV, "first")
  return workdir


@pytest.mark.slow
def test_main_two_processes_train_evaluate_and_resume(smoke_workdir,
                                                      data_dir):
  """The real entry point: train, evaluate and checkpoint as 2 processes, then
  both restart with more steps and resume from the checkpoint."""
  # pylint: disable=g-import-not-at-top
  from mlimages_jax.checkpoints import store
  from mlimages_jax.evaluation import metrics
  from mlimages_jax.train import schedule as schedule_lib
  env, workdir = ENV, smoke_workdir

  # Smoke: global batch 16 over 4 devices (8 per process), 6 steps, logs
  # at 2, 3 (checkpoint), 4, 6; one evaluation at the end. Only process 0
  # writes logs: a second writer would duplicate every line.
  def lines():
    return [json.loads(line) for line in
            (workdir / "metrics.jsonl").read_text().splitlines()]
  first = lines()
  assert [l["step"] for l in first if "loss" in l] == [2, 3, 4, 6]
  evals = [l for l in first if "mAP" in l]
  assert [(l["step"], l["split"]) for l in evals] == [(6, "validation")]
  assert 0.0 < evals[0]["mAP"] <= 1.0
  assert all(np.isfinite(l["loss"]) and l["decode_failures"] == 0
             for l in first if "loss" in l)
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
  config = json.loads((workdir / "config.json").read_text())
  assert config["batch_size"] == 16 and config["num_train_steps"] == 6
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [3, 6]
  # Each process saved the position in its own half of the split.
  for step in steps:
    states = _input_states(workdir, step)
    assert [(s["process_index"], s["process_count"], s["batches"],
             s["examples"]) for s in states] == [
                 (i, 2, step, 8 * step) for i in range(2)]
  variables, metadata = store.load_for_inference(workdir)
  assert metadata["step"] == 6
  assert variables["params"]["logits"]["kernel"].shape[-1] == (
      SYNTHETIC_CLASSES)

  # Both restart with 8 steps: they resume at step 6 (the inputs continue
  # from example 48 of each half), train 7-8, save and evaluate again.
  logs = _run_main(workdir, data_dir, env, "restart",
                   "--config.num_train_steps=8")
  assert "Resumed from step 6 of 8" in logs[0]
  assert "Resumed from step 6 of 8" in logs[1]
  second = lines()
  assert second[:len(first)] == first
  assert [l["step"] for l in second[len(first):]] == [8, 8]
  learning_rate_fn = schedule_lib.create_learning_rate_fn(
      pretrain.get_config("smoke"))
  for line in second:
    if "loss" in line:
      assert line["learning_rate"] == pytest.approx(
          float(learning_rate_fn(line["step"] - 1)))
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 2
  assert [(s["batches"], s["examples"]) for s in _input_states(workdir, 8)
          ] == [(8, 64)] * 2
  variables, metadata = store.load_for_inference(workdir)
  assert metadata["step"] == 8
  # The logged mAP ranks the scores of BOTH processes: each evaluated the
  # first 2 local batches (64 images) of its half of the validation split.
  # Recomputed here in one process from the step-8 checkpoint; process 0's
  # half alone scores differently, so a missing gather would show.
  halves = _evaluated_halves(variables, data_dir)
  scores, labels = (np.concatenate(x) for x in zip(*halves))
  assert scores.shape == (128, SYNTHETIC_CLASSES)
  assert second[-1]["mAP"] == pytest.approx(
      metrics.mean_average_precision(scores, labels), abs=1e-6)
  assert abs(metrics.mean_average_precision(*halves[0])
             - second[-1]["mAP"]) > 1e-3


@pytest.mark.slow
def test_main_two_processes_stop_together_on_a_signal(tmp_path, data_dir,
                                                      smoke_workdir):
  """SIGINT to process 1 during an evaluation: both processes save the same
  step (with both input positions) and exit with 75; the same command
  resumes and ends with the train state of the uninterrupted run."""
  workdir, port = tmp_path / "work", _free_port()
  command = [sys.executable, str(REPO / "main.py"),
             f"--config={REPO / 'configs' / 'pretrain.py'}:smoke",
             f"--workdir={workdir}", f"--config.data_dir={data_dir}",
             "--config.eval_every_steps=2",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  log_1 = tmp_path / "process_1.log"
  with log_1.open("w") as log:
    second = subprocess.Popen(command + ["--process_id=1"], env=ENV,
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  first = subprocess.Popen(command + ["--process_id=0"], env=ENV, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  lines, sent = [], False
  for line in first.stderr:
    lines.append(line)
    if not sent and "step 2: evaluating" in line:
      second.send_signal(signal.SIGINT)
      sent = True
  first.wait(timeout=600)
  second.wait(timeout=600)
  logs = ["".join(lines), log_1.read_text()]
  assert [first.returncode, second.returncode] == [75, 75], logs[1][-3000:]
  stopped = [int(re.search(r"Preempted: stopped at step (\d+)", log)[1])
             for log in logs]
  # The service agrees on the boundary after the last one any process had
  # passed when the notice reached it: 3, or later if it came late.
  assert stopped[0] == stopped[1] and 3 <= stopped[0] < 6, stopped
  assert "SIGINT received after the boundary of step" in logs[1]
  assert [(s["batches"], s["examples"])
          for s in _input_states(workdir, stopped[0])] == [
              (stopped[0], 8 * stopped[0])] * 2

  logs = _run_main(workdir, data_dir, ENV, "resumed",
                   "--config.eval_every_steps=2")
  assert f"Resumed from step {stopped[0]} of 6" in logs[0]
  assert_same_checkpoint(smoke_workdir, workdir, 6)


def _evaluated_halves(variables, data_dir: pathlib.Path
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(logits, labels) of what each of the 2 processes evaluates in the smoke
  config: eval batch 64 (32 per process) and 128 examples, so the first 2
  local batches of each process's half of the split."""
  # pylint: disable=g-import-not-at-top
  import jax
  from mlimages_jax.inputs import pipeline
  from mlimages_jax.inputs import preprocessing
  from mlimages_jax.train import state as state_lib
  config = pretrain.get_config("smoke")
  model = state_lib.create_model(config, SYNTHETIC_CLASSES)
  apply = jax.jit(lambda images: model.apply(
      variables, preprocessing.normalize(images), train=False)[0])
  halves = []
  for process_index in range(2):
    iterator = pipeline.create_input_iterator(
        dataset=config.dataset, data_dir=str(data_dir),
        split=config.eval_split, global_batch_size=config.eval_batch_size,
        image_size=config.image_size, mode="eval", label_mode="multi",
        seed=config.seed, process_index=process_index, process_count=2,
        local_device_count=1)
    batches = [next(iterator) for _ in range(
        config.num_eval_examples // config.eval_batch_size)]
    assert all(batch["mask"].all() for batch in batches)
    halves.append((np.concatenate([np.asarray(apply(b["image"][0]))
                                   for b in batches]),
                   np.concatenate([b["labels"][0] for b in batches])))
  return halves


if __name__ == "__main__":
  worker(pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
         int(sys.argv[4]), int(sys.argv[5]))
