"""Tests of Orbax checkpoints: round trips, compatibility, inference loading."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import optax
import pytest

from mlimages_jax.checkpoints import store
from mlimages_jax.train import losses
from mlimages_jax.train import state as state_lib

NUM_CLASSES = 3


def _metadata(num_classes: int = NUM_CLASSES, depth: int = 14) -> dict:
  return store.make_metadata(
      depth=depth, num_classes=num_classes, width_multiplier=0.25,
      image_size=32, label_mode="multi",
      class_ids=[f"n{i:08d}" for i in range(num_classes)],
      class_names=[f"class {i}" for i in range(num_classes)])


def _state(seed: int) -> state_lib.TrainState:
  """A train state with every kind of leaf, filled with distinct values."""
  rng = np.random.default_rng(seed)
  params = {"init_conv": {"kernel": rng.normal(size=(3, 3, 3, 4))},
            "conv1_b2_bn": {"scale": rng.normal(size=4),
                            "bias": rng.normal(size=4)},
            "logits": {"kernel": rng.normal(size=(4, NUM_CLASSES)),
                       "bias": rng.normal(size=NUM_CLASSES)}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = jax.tree.map(
      lambda x: rng.normal(size=np.shape(x)).astype(np.float32),
      tx.init(params))
  return state_lib.TrainState(
      step=np.int32(seed),
      params=params,
      batch_stats={
          "conv1_b2_bn": {
              "mean": rng.normal(size=4).astype(np.float32),
              "var": rng.random(4).astype(np.float32)
          }
      },
      opt_state=opt_state,
      loss_state=losses.LossState(
          pos_count=rng.integers(0, 9, NUM_CLASSES).astype(np.float32),
          neg_count=rng.integers(0, 9, NUM_CLASSES).astype(np.float32)),
      rng=np.asarray(jax.random.PRNGKey(seed)))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_with_loss_and_iterator_state_keeps_last_k(tmp_path):
  checkpointer = store.TrainCheckpointer(tmp_path, keep=2)
  for step in (3, 6, 9):
    checkpointer.save(step, _state(step), _metadata(),
                      f"iterator at {step}\x00\xff".encode("latin-1"))
  checkpointer.wait_until_finished()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [6, 9]
  assert checkpointer.latest_step() == 9
  checkpointer.close()

  # A fresh manager (a restarted process) finds and restores everything.
  reopened = store.TrainCheckpointer(tmp_path, keep=2)
  assert reopened.latest_step() == 9
  metadata = reopened.metadata(9)
  assert metadata == dict(_metadata(), step=9)
  restored, position = reopened.restore(9, _state(0))
  _assert_trees_equal(restored, _state(9))
  assert isinstance(restored.loss_state, losses.LossState)
  assert position == "iterator at 9\x00\xff".encode("latin-1")
  reopened.close()


def test_checkpoint_without_iterator_state(tmp_path):
  checkpointer = store.TrainCheckpointer(tmp_path, async_save=False)
  checkpointer.save(1, _state(1), _metadata(), None)
  restored, position = checkpointer.restore(1, _state(0))
  assert position is None
  _assert_trees_equal(restored, _state(1))
  checkpointer.close()


@pytest.mark.parametrize("changes, message", [
    (dict(num_classes=5), "model.num_classes: checkpoint 3, config 5"),
    (dict(depth=26), "model.depth: checkpoint 14, config 26"),
])
def test_incompatible_checkpoint_is_rejected(changes, message):
  with pytest.raises(store.CheckpointError, match=message):
    store.check_compatible(_metadata(), _metadata(**changes), "ckpt/7")


def test_same_count_different_classes_is_rejected():
  other = _metadata()
  other["classes"]["ids"] = list(reversed(other["classes"]["ids"]))
  with pytest.raises(store.CheckpointError, match="class ids differ"):
    store.check_compatible(_metadata(), other, "ckpt/7")
  store.check_compatible(_metadata(), dict(_metadata(), image_size=64),
                               "ckpt/7")  # Image size may change.


def test_label_closure_is_recorded_and_must_not_change_on_resume():
  closed = dict(_metadata(), label_closure="closed")
  store.validate_metadata(closed)
  assert _metadata()["label_closure"] is None  # Not recorded: any dataset.
  store.check_compatible(_metadata(), closed, "ckpt/7")
  with pytest.raises(store.CheckpointError,
                     match="label_closure: checkpoint 'closed', dataset "
                     "'as_given'"):
    store.check_compatible(closed, dict(closed, label_closure="as_given"),
                           "ckpt/7")
  with pytest.raises(store.CheckpointError, match="label_closure must be"):
    store.validate_metadata(dict(closed, label_closure="open"))


def test_malformed_metadata_is_rejected():
  broken = _metadata()
  broken["classes"]["names"] = broken["classes"]["names"][:-1]
  with pytest.raises(store.CheckpointError,
                     match=r"x: 3 class ids and 2 names for 3 classes"):
    store.validate_metadata(broken, "x")
  with pytest.raises(store.CheckpointError, match="not an mlimages-jax"):
    store.validate_metadata({"format": "other"}, "x")


def test_load_for_inference_reads_training_checkpoints(tmp_path):
  checkpointer = store.TrainCheckpointer(tmp_path)
  for step in (4, 8):
    checkpointer.save(step, _state(step), _metadata(), b"pos")
  checkpointer.close()
  expected = _state(8)
  for path in (tmp_path, tmp_path / "checkpoints",
               tmp_path / "checkpoints" / "8"):
    variables, metadata = store.load_for_inference(path)
    assert metadata["step"] == 8
    _assert_trees_equal(variables, {"params": expected.params,
                                    "batch_stats": expected.batch_stats})
  variables, metadata = store.load_for_inference(
      tmp_path / "checkpoints" / "4")
  assert metadata["step"] == 4
  _assert_trees_equal(variables["params"], _state(4).params)


def test_load_for_inference_accepts_relative_paths(tmp_path, monkeypatch):
  checkpointer = store.TrainCheckpointer(tmp_path / "run")
  checkpointer.save(3, _state(3), _metadata(), b"pos")
  checkpointer.close()
  monkeypatch.chdir(tmp_path)
  variables, metadata = store.load_for_inference("run")
  assert metadata["step"] == 3
  _assert_trees_equal(variables["params"], _state(3).params)


def test_inference_checkpoint_round_trip_is_atomic(tmp_path):
  state = _state(5)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  path = store.save_inference_checkpoint(tmp_path / "model", variables,
                                               _metadata())
  loaded, metadata = store.load_for_inference(path)
  _assert_trees_equal(loaded, variables)
  assert metadata == _metadata()
  assert json.loads((path / store.INFERENCE_METADATA_FILE).read_text()
                    )["model"]["num_classes"] == NUM_CLASSES
  with pytest.raises(store.CheckpointError, match="exists"):
    store.save_inference_checkpoint(path, variables, _metadata())
  replacement = {"params": _state(6).params,
                 "batch_stats": _state(6).batch_stats}
  store.save_inference_checkpoint(path, replacement, _metadata(),
                                        overwrite=True)
  _assert_trees_equal(store.load_for_inference(path)[0], replacement)
  # No temporary directories are left behind.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
  # overwrite replaces an inference checkpoint, never another directory
  # (`convert-tf-checkpoint --out RUN --overwrite`).
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "notes.txt").write_text("mine")
  with pytest.raises(store.CheckpointError, match="not an inference"):
    store.save_inference_checkpoint(tmp_path / "run", replacement,
                                    _metadata(), overwrite=True)
  assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_load_for_inference_errors(tmp_path):
  with pytest.raises(store.CheckpointError, match="no such checkpoint"):
    store.load_for_inference(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(store.CheckpointError, match="no checkpoint here"):
    store.load_for_inference(tmp_path / "empty")
  with pytest.raises(store.CheckpointError, match="must be exactly"):
    store.save_inference_checkpoint(
        tmp_path / "x", {"params": {}}, _metadata())


# ---------------------------------------------------------------------------
# Damaged checkpoints: real Orbax checkpoints, then the damage a crash, a
# full disk or a bad disk leaves.


def _saved_run(workdir, steps=(3, 6)) -> None:
  checkpointer = store.TrainCheckpointer(workdir, keep=5)
  for step in steps:
    checkpointer.save(step, _state(step), _metadata(), f"at {step}".encode())
  checkpointer.close()


def _checkpoint_dirs(workdir) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _contents(directory: pathlib.Path) -> dict[str, str]:
  """Relative path -> SHA-256 of every file below `directory`: what a move
  aside must keep byte for byte."""
  contents = {str(p.relative_to(directory)):
              hashlib.sha256(p.read_bytes()).hexdigest()
              for p in directory.rglob("*") if p.is_file()}
  assert contents
  return contents


def _array_files(step_dir):
  return [p for p in (step_dir / "state").rglob("*")
          if p.is_file() and p.parent.name == "d"]


def _truncate_arrays(step_dir):
  for path in _array_files(step_dir):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _delete_arrays(step_dir):
  for path in _array_files(step_dir):
    path.unlink()


def _corrupt_metadata(step_dir):
  (step_dir / "metadata" / "metadata").write_text('{"format": "mlimages-j')


def _corrupt_array_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("not json")


@pytest.mark.parametrize("damage, reason", [
    (_truncate_arrays, "bad-state"),
    (_delete_arrays, "bad-state"),
    (_corrupt_metadata, "bad-metadata"),
    (_corrupt_array_metadata, "bad-state"),
])
def test_damaged_newest_checkpoint_is_moved_aside(tmp_path, caplog, damage,
                                                  reason):
  _saved_run(tmp_path)
  damage(tmp_path / "checkpoints" / "6")
  damaged = _contents(tmp_path / "checkpoints" / "6")
  checkpointer = store.TrainCheckpointer(tmp_path)
  with caplog.at_level("WARNING"):
    step, restored, position = checkpointer.restore_newest(_state(0),
                                                           _metadata())
  checkpointer.close()
  assert (step, position) == (3, b"at 3")
  _assert_trees_equal(restored, _state(3))
  # Moved, not deleted, byte for byte; the log says which and why.
  assert sorted(p.name for p in (tmp_path / "checkpoints_bad").iterdir()) == [
      f"6-{reason}"]
  assert _contents(tmp_path / "checkpoints_bad" / f"6-{reason}") == damaged
  assert _checkpoint_dirs(tmp_path) == ["3"]
  assert f"Checkpoint step 6 ({tmp_path / 'checkpoints' / '6'}) cannot be " \
      "used" in caplog.text
  # The tools skip it too (without moving anything) and say which step.
  _, metadata = store.load_for_inference(tmp_path)
  assert metadata["step"] == 3


def test_unfinished_save_is_moved_aside(tmp_path, caplog):
  """What a killed save leaves: Orbax's temporary step directory."""
  _saved_run(tmp_path)
  shutil.copytree(tmp_path / "checkpoints" / "6",
                  tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234")
  _delete_arrays(tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234")
  unfinished = _contents(tmp_path / "checkpoints" /
                         "9.orbax-checkpoint-tmp-1234")
  with caplog.at_level("WARNING"):
    checkpointer = store.TrainCheckpointer(tmp_path)
  assert "the save never finished" in caplog.text
  assert checkpointer.latest_step() == 6
  checkpointer.close()
  assert _checkpoint_dirs(tmp_path) == ["3", "6"]
  assert sorted(p.name for p in (tmp_path / "checkpoints_bad").iterdir()) == [
      "9-unfinished-save"]
  assert _contents(tmp_path / "checkpoints_bad" / "9-unfinished-save") == (
      unfinished)


def test_no_restorable_checkpoint_starts_fresh(tmp_path):
  _saved_run(tmp_path)
  damaged = {}
  for step in ("3", "6"):
    _truncate_arrays(tmp_path / "checkpoints" / step)
    damaged[f"{step}-bad-state"] = _contents(tmp_path / "checkpoints" / step)
  checkpointer = store.TrainCheckpointer(tmp_path)
  assert checkpointer.restore_newest(_state(0), _metadata()) is None
  checkpointer.close()
  assert {p.name: _contents(p) for p in (tmp_path / "checkpoints_bad"
                                           ).iterdir()} == damaged
  with pytest.raises(store.CheckpointError, match="no checkpoint here"):
    store.load_for_inference(tmp_path)


def test_another_runs_checkpoint_is_refused_not_moved(tmp_path):
  """Intact checkpoints of another model or optimizer stop the run: moving
  them aside would silently restart training from scratch."""
  _saved_run(tmp_path)
  other = _state(0).replace(opt_state=())  # Another optimizer's state.
  checkpointer = store.TrainCheckpointer(tmp_path)
  with pytest.raises(store.CheckpointError,
                     match=r"checkpoints/6/state was written by an "
                     r"incompatible run: it holds \d+ arrays, this config's "
                     r"train state \d+"):
    checkpointer.restore_newest(other, _metadata())
  with pytest.raises(store.CheckpointError, match="model.num_classes"):
    checkpointer.restore_newest(_state(0), _metadata(num_classes=5))
  checkpointer.close()
  assert _checkpoint_dirs(tmp_path) == ["3", "6"]
  assert not (tmp_path / "checkpoints_bad").exists()


def test_damaged_step_directory_is_refused_with_the_reason(tmp_path):
  _saved_run(tmp_path)
  _truncate_arrays(tmp_path / "checkpoints" / "6")
  with pytest.raises(store.CheckpointError,
                     match=r"checkpoints/6: cannot be restored \("):
    store.load_for_inference(tmp_path / "checkpoints" / "6")
