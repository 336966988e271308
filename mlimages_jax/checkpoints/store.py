"""Orbax checkpoints: training runs that resume exactly, and inference weights.

A training checkpoint is one Orbax step directory under ``<workdir>/checkpoints``
with three items:

- ``state``: the whole (unreplicated) train state: parameters, batch statistics,
  optimizer state, the adaptive loss counters, the RNG and the step;
- ``metadata``: the JSON that every other tool needs to use the weights without
  the training config (model, classes, image size, label mode, step);
- ``input_iterator``: one file per process with that process's input iterator
  state, so a resumed run reads exactly the batches an uninterrupted run would.

A run resumes from the newest checkpoint that restores: one that does not
(a save that never finished, unreadable metadata or arrays) is logged and
moved, never deleted, to ``<workdir>/checkpoints_bad/<step>-<reason>``. A
checkpoint of another model or optimizer is not damaged but the wrong one: it
stops the run with the reason instead.

An inference checkpoint (``save_inference_checkpoint``, used by the TF
checkpoint converter) is a directory with ``mlimages_metadata.json`` and an
Orbax pytree ``variables`` holding only ``params`` and ``batch_stats``.
``load_for_inference`` reads both kinds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mlimages_jax import fileio
from mlimages_jax.data.closure import LABEL_CLOSURES

FORMAT = "mlimages-jax"
CHECKPOINT_DIR = "checkpoints"
BAD_CHECKPOINT_DIR = "checkpoints_bad"
INFERENCE_METADATA_FILE = "mlimages_metadata.json"
_STATE = "state"
_METADATA = "metadata"
_INPUT = "input_iterator"
_VARIABLES = "variables"
_LABEL_MODES = ("multi", "single")


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed or does not fit the current run."""


# What reading a damaged checkpoint raises: missing files (OSError), JSON,
# TensorStore and Orbax errors (ValueError), missing entries (KeyError).
_DAMAGE = (OSError, ValueError, KeyError)


def make_metadata(*, depth: int, num_classes: int, width_multiplier: float,
                  image_size: int, label_mode: str, class_ids: Sequence[str],
                  class_names: Sequence[str], step: int = 0,
                  label_closure: str | None = None,
                  optimization: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
  """The metadata every checkpoint carries (the TEAM.md contract).

  `label_closure` is what the training dataset did to its annotations
  ("closed" / "as_given", from the dataset's metadata); None: not recorded
  (converted weights, datasets without the record). `optimization` is the
  run's optimizer and schedule (``optimizer.optimization_record``); None:
  not recorded.
  """
  metadata = {
      "format": FORMAT,
      "model": {"depth": int(depth), "num_classes": int(num_classes),
                "width_multiplier": float(width_multiplier)},
      "image_size": int(image_size),
      "label_mode": label_mode,
      "classes": {"ids": [str(i) for i in class_ids],
                  "names": [str(n) for n in class_names]},
      "step": int(step),
      "label_closure": label_closure,
      "optimization": None if optimization is None else dict(optimization),
  }
  validate_metadata(metadata)
  return metadata


def validate_metadata(metadata: Mapping[str, Any], source: str = "metadata"):
  """Raises CheckpointError unless `metadata` follows the contract."""
  def fail(message: str):
    raise CheckpointError(f"{source}: {message}")

  if not isinstance(metadata, Mapping) or metadata.get("format") != FORMAT:
    fail(f"not an {FORMAT} checkpoint (format field is "
         f"{metadata.get('format') if isinstance(metadata, Mapping) else None!r})")
  model = metadata.get("model")
  if not isinstance(model, Mapping) or not {
      "depth", "num_classes", "width_multiplier"} <= set(model):
    fail("'model' must have depth, num_classes and width_multiplier")
  if metadata.get("label_mode") not in _LABEL_MODES:
    fail(f"label_mode must be one of {_LABEL_MODES}, "
         f"got {metadata.get('label_mode')!r}")
  for key in ("image_size", "step"):
    if not isinstance(metadata.get(key), int):
      fail(f"{key!r} must be an integer")
  classes = metadata.get("classes")
  if not isinstance(classes, Mapping) or not {"ids", "names"} <= set(classes):
    fail("'classes' must have 'ids' and 'names'")
  if metadata.get("label_closure") not in (*LABEL_CLOSURES, None):
    fail(f"label_closure must be one of {LABEL_CLOSURES} or null, got "
         f"{metadata.get('label_closure')!r}")
  if not isinstance(metadata.get("optimization"), (Mapping, type(None))):
    fail("'optimization' must be an object or null")
  if not (len(classes["ids"]) == len(classes["names"]) == model["num_classes"]):
    fail(f"{len(classes['ids'])} class ids and {len(classes['names'])} names "
         f"for {model['num_classes']} classes")


def check_compatible(saved: Mapping[str, Any], expected: Mapping[str, Any],
                     source: str):
  """Refuses to resume a run whose checkpoint holds a different model/classes.

  Image size may differ (the network is fully convolutional and the original
  fine-tuning recipe switches from 224 to 299); everything that changes a
  parameter's shape or meaning may not.
  """
  validate_metadata(saved, source)
  problems = []
  for key in ("depth", "num_classes", "width_multiplier"):
    if saved["model"][key] != expected["model"][key]:
      problems.append(f"model.{key}: checkpoint {saved['model'][key]}, "
                      f"config {expected['model'][key]}")
  if saved["label_mode"] != expected["label_mode"]:
    problems.append(f"label_mode: checkpoint {saved['label_mode']!r}, "
                    f"config {expected['label_mode']!r}")
  if (saved["model"]["num_classes"] == expected["model"]["num_classes"]
      and list(saved["classes"]["ids"]) != list(expected["classes"]["ids"])):
    problems.append("class ids differ (same count, different classes/order)")
  closures = (saved.get("label_closure"), expected.get("label_closure"))
  if None not in closures and closures[0] != closures[1]:
    problems.append(f"label_closure: checkpoint {closures[0]!r}, dataset "
                    f"{closures[1]!r}")
  if problems:
    raise CheckpointError(
        f"{source} was written by an incompatible run: " + "; ".join(problems)
        + ". Use a new --workdir, or delete that checkpoint directory to "
        "start over.")


# ---------------------------------------------------------------------------
# Per-process input iterator state.


class IteratorStateHandler(ocp.CheckpointHandler):
  """Writes each process's iterator state bytes to its own file.

  Every process reads its own shard of the data, so each has its own position;
  the file name records the process count so that a restart with a different
  number of processes is detected instead of silently mis-reading.
  """

  def _file(self, directory: epath.Path) -> epath.Path:
    return directory / (f"process_{jax.process_index()}"
                        f"-of-{jax.process_count()}.bin")

  def save(self, directory: epath.Path, args: IteratorStateSave):
    directory.mkdir(parents=True, exist_ok=True)
    self._file(directory).write_bytes(args.state)

  def restore(self, directory: epath.Path,
              args: IteratorStateRestore | None = None) -> bytes | None:
    path = self._file(directory)
    if not path.exists():
      logging.warning(
          "%s has no input state for process %d of %d (saved with another "
          "process count?); the input pipeline restarts from its beginning.",
          directory, jax.process_index(), jax.process_count())
      return None
    return path.read_bytes()

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  state: bytes


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


# ---------------------------------------------------------------------------
# Training checkpoints.


def _to_host(tree: Any) -> Any:
  """Plain NumPy copies: every process saves the same replicated values."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


class TrainCheckpointer:
  """Orbax CheckpointManager for one training run (asynchronous, keep K).

  Every process opens it; process 0 moves damaged checkpoints aside, the
  others wait for it (the workdir is shared).
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3,
               async_save: bool = True):
    self.directory = epath.Path(workdir) / CHECKPOINT_DIR
    self.bad_directory = epath.Path(workdir) / BAD_CHECKPOINT_DIR
    self._saving: int | None = None  # The step of the save in flight.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save,
            # Unfinished saves are moved aside below, not deleted.
            cleanup_tmp_directories=False),
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _METADATA: ocp.JsonCheckpointHandler(),
            _INPUT: IteratorStateHandler(),
        })
    finished = {str(step) for step in self._manager.all_steps()}
    unfinished = [p for p in self.directory.iterdir()
                  if p.name[:1].isdigit() and p.name not in finished]
    for path in sorted(unfinished, key=lambda p: p.name):
      step = int("".join(itertools.takewhile(str.isdigit, path.name)))
      self._move_aside(path, step, "unfinished-save",
                       "the save never finished (the process was killed or "
                       "the disk filled up while writing it)")
    _sync_processes("mlimages_unfinished_checkpoints")

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def metadata(self, step: int) -> dict[str, Any]:
    """Reads only the JSON metadata (cheap: used before any compilation)."""
    path = self.directory / str(step) / _METADATA
    metadata = self._manager.restore(
        step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
    metadata = metadata[_METADATA]
    validate_metadata(metadata, str(path))
    return metadata

  def save(self, step: int, state: Any, metadata: Mapping[str, Any],
           iterator_state: bytes | None) -> None:
    """Starts an (asynchronous) save; `state` may live on device."""
    items = {
        _STATE: ocp.args.StandardSave(_to_host(state)),
        _METADATA: ocp.args.JsonSave(dict(metadata, step=int(step))),
    }
    if iterator_state is not None:
      items[_INPUT] = IteratorStateSave(iterator_state)
    with self._save_errors():
      self._saving = step
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, target: Any) -> tuple[Any, bytes | None]:
    """Restores the state into `target`'s structure (arrays or their
    ``jax.ShapeDtypeStruct``), plus this process's input iterator state
    (None when the checkpoint has none)."""
    abstract = _abstract(target)
    items = {_STATE: ocp.args.StandardRestore(abstract)}
    has_input = (self.directory / str(step) / _INPUT).exists()
    if has_input:
      items[_INPUT] = IteratorStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = jax.tree.map(np.asarray, restored[_STATE])
    return state, (restored[_INPUT] if has_input else None)

  def restore_newest(self, target: Any, expected: Mapping[str, Any]
                     ) -> tuple[int, Any, bytes | None] | None:
    """``(step, state, input position)`` of the newest checkpoint that
    restores, or None when there is none.

    A checkpoint that does not restore, on any process, is moved aside and
    the next older one tried. One that restores but belongs to another run
    (`check_compatible`, or different array shapes: another model or
    optimizer) raises CheckpointError: that is the wrong workdir or config,
    not damage.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      source = self.directory / str(step)
      restored, problem = None, None
      try:
        metadata = self.metadata(step)
      except (CheckpointError, *_DAMAGE) as e:
        problem = ("bad-metadata", e)
      else:
        check_compatible(metadata, expected, str(source))
        problem = self._check_shapes(step, target)
      if problem is None:
        try:
          restored = self.restore(step, target)
        except _DAMAGE as e:
          problem = ("bad-state", e)
      if not _any_process(problem is not None):
        return step, *restored
      reason, error = problem or ("bad-on-another-process",
                                  "another process could not restore it")
      self._move_aside(source, step, reason, _first_line(error))
      _sync_processes(f"mlimages_bad_checkpoint_{step}")
      self._manager.reload()
    return None

  def _check_shapes(self, step: int, target: Any
                    ) -> tuple[str, BaseException] | None:
    """A damage problem, or None; raises CheckpointError on another run's
    arrays (the same leaves, shapes and dtypes are required)."""
    path = self.directory / str(step) / _STATE
    try:
      got = _shapes(ocp.StandardCheckpointHandler().metadata(path))
    except _DAMAGE as e:
      return ("bad-state", e)
    want = _shapes(_abstract(target))
    if got != want:
      raise CheckpointError(
          f"{path} was written by an incompatible run: it holds "
          f"{len(got)} arrays, this config's train state {len(want)} "
          f"(first difference: {sorted(set(got) ^ set(want))[:1]}); another "
          "model or optimizer? Use a new --workdir, or move that checkpoint "
          "directory away to start over.")
    return None

  def _move_aside(self, path: epath.Path, step: int, reason: str,
                  why: str) -> None:
    """Process 0 renames `path` into the bad-checkpoint directory."""
    target = self.bad_directory / f"{step}-{reason}"
    suffix = 1
    while target.exists():
      suffix += 1
      target = self.bad_directory / f"{step}-{reason}-{suffix}"
    logging.warning("Checkpoint step %d (%s) cannot be used: %s. Moved to %s "
                    "(nothing is deleted).", step, path, why, target)
    if jax.process_index() == 0:
      self.bad_directory.mkdir(parents=True, exist_ok=True)
      path.rename(target)

  @contextlib.contextmanager
  def _save_errors(self):
    """Turns a failed write (full disk, read-only workdir) into a clear
    CheckpointError; Orbax writes into a temporary directory and deletes
    old checkpoints only after a save completes, so older ones stay intact.
    """
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      # Orbax re-raises a failed asynchronous save at the next call.
      older = [s for s in self._manager.all_steps() if s != self._saving]
      raise CheckpointError(
          f"Could not write checkpoint step {self._saving} to "
          f"{self.directory}: {_first_line(e)}. Older checkpoints are intact "
          f"(steps {older}); once there is space (or the workdir is writable) "
          f"the same command resumes from step {max(older, default=0)}."
      ) from e

  def wait_until_finished(self) -> None:
    with self._save_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._save_errors():
      self._manager.close()


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                      tree)


def _shapes(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  return sorted((tuple(x.shape), str(np.dtype(x.dtype)))
                for x in jax.tree.leaves(tree))


def _first_line(error: BaseException | str) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0][:500]


def _any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (every process must call)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------
# Inference.


def _numpy_restore_args(metadata_tree: Any) -> Any:
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                      metadata_tree)


def _restore_subtrees(path: epath.Path, keys: Sequence[str]) -> dict[str, Any]:
  """Restores the top-level `keys` of a pytree checkpoint as NumPy arrays."""
  checkpointer = ocp.PyTreeCheckpointer()
  item_metadata = checkpointer.metadata(path).item_metadata
  if item_metadata is None:  # Orbax only logs what it could not read.
    raise CheckpointError(f"{path}: its array metadata is missing or "
                          "unreadable")
  tree_metadata = item_metadata.tree
  missing = [k for k in keys if k not in tree_metadata]
  if missing:
    raise CheckpointError(f"{path}: no {missing} in the checkpoint")
  partial = {k: tree_metadata[k] for k in keys}
  restored = checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(
          item=partial, restore_args=_numpy_restore_args(partial),
          partial_restore=True))
  return {k: restored[k] for k in keys}


def _training_step_dirs(path: epath.Path) -> list[epath.Path]:
  """A workdir, its checkpoints dir, or a step dir -> the step dirs to try,
  newest first (a step dir: only itself)."""
  if (path / CHECKPOINT_DIR).is_dir():
    path = path / CHECKPOINT_DIR
  if (path / _STATE).is_dir():
    return [path]
  steps = [int(p.name) for p in path.iterdir()
           if p.is_dir() and p.name.isdigit() and (p / _STATE).is_dir()]
  if not steps:
    raise CheckpointError(
        f"{path}: no checkpoint here (expected a workdir, its "
        f"'{CHECKPOINT_DIR}' directory, a step directory or an inference "
        f"checkpoint with {INFERENCE_METADATA_FILE})")
  return [path / str(step) for step in sorted(steps, reverse=True)]


def _load_step_dir(step_dir: epath.Path
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  metadata_path = step_dir / _METADATA / "metadata"
  if not metadata_path.exists():
    raise CheckpointError(f"{step_dir}: the checkpoint has no metadata")
  try:
    metadata = json.loads(metadata_path.read_text())
    validate_metadata(metadata, str(metadata_path))
    variables = _restore_subtrees(step_dir / _STATE, ("params", "batch_stats"))
  except _DAMAGE as e:
    raise CheckpointError(
        f"{step_dir}: cannot be restored ({type(e).__name__}: "
        f"{_first_line(e)})") from e
  return variables, metadata


def load_for_inference(path: str | os.PathLike
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads ``({"params", "batch_stats"}, metadata)`` as NumPy arrays.

  `path` is a training workdir, its checkpoints directory, one step's
  directory, or an inference checkpoint written by
  `save_inference_checkpoint`. Of a workdir the newest step that restores
  is used (each one skipped is logged with the reason; nothing is moved);
  ``metadata["step"]`` says which. A step directory that does not restore
  raises CheckpointError with the reason.
  """
  path = fileio.as_path(path)  # Absolute, as Orbax needs; or gs://...
  if not path.exists():
    raise CheckpointError(f"{path}: no such checkpoint")
  if not path.is_dir():
    raise CheckpointError(
        f"{path} is a file, not a checkpoint folder: give a training workdir,"
        " one of its step folders or an inference checkpoint folder")
  if (path / INFERENCE_METADATA_FILE).is_file():
    metadata_path = path / INFERENCE_METADATA_FILE
    try:
      metadata = json.loads(metadata_path.read_text())
      validate_metadata(metadata, str(metadata_path))
      variables = _restore_subtrees(path / _VARIABLES,
                                    ("params", "batch_stats"))
    except CheckpointError:
      raise
    except Exception as e:  # Orbax/TensorStore errors of a corrupt directory.
      raise CheckpointError(
          f"{path}: cannot read the checkpoint ({type(e).__name__}: "
          f"{_first_line(e)})") from e
    return variables, metadata
  candidates = _training_step_dirs(path)
  for step_dir in candidates[:-1]:
    try:
      return _load_step_dir(step_dir)
    except CheckpointError as e:
      logging.warning("Skipping checkpoint %s: %s; trying the next older "
                      "one.", step_dir, e)
  return _load_step_dir(candidates[-1])


def save_inference_checkpoint(path: str | os.PathLike,
                              variables: Mapping[str, Any],
                              metadata: Mapping[str, Any], *,
                              overwrite: bool = False) -> epath.Path:
  """Writes weights + metadata atomically, locally or remotely (gs://).

  Locally: a temporary directory renamed into place. An object store has no
  directory rename, so there the weights are written in place and the
  metadata file, written last in one upload, is the commit: a reader
  (`load_for_inference`) finds no checkpoint until it exists.
  """
  path = fileio.as_path(path)
  validate_metadata(metadata, str(path / INFERENCE_METADATA_FILE))
  if set(variables) != {"params", "batch_stats"}:
    raise CheckpointError(
        f"{path}: variables must be exactly 'params' and 'batch_stats', got "
        f"{sorted(variables)}")
  if path.exists() and not overwrite:
    raise CheckpointError(f"{path} exists (pass overwrite=True to replace it)")
  if path.exists() and not (path / INFERENCE_METADATA_FILE).is_file():
    raise CheckpointError(
        f"{path} exists and is not an inference checkpoint (no "
        f"{INFERENCE_METADATA_FILE} in it): refusing to replace it")

  def write(directory: epath.Path) -> None:
    ocp.PyTreeCheckpointer().save(
        directory / _VARIABLES,
        args=ocp.args.PyTreeSave(_to_host(dict(variables))))
    with fileio.atomic_writer(directory / INFERENCE_METADATA_FILE) as f:
      f.write(json.dumps(dict(metadata), indent=1))

  if fileio.is_remote(path):
    if path.exists():  # Uncommit first: never old metadata on new weights.
      (path / INFERENCE_METADATA_FILE).unlink(missing_ok=True)
      path.rmtree()
    write(path)
    return path
  with fileio.atomic_directory(path, marker=INFERENCE_METADATA_FILE,
                               overwrite=True) as tmp:
    write(epath.Path(tmp))
  return path
