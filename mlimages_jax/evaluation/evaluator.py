"""Evaluation of a model on a TFDS split -> ``<workdir>/eval_results.json``.

The one evaluation path of the project: `mlimages evaluate` runs it on a
checkpoint (`evaluate_checkpoint`), the training loop on its current state
(`evaluate_model`, via train/evaluator.py), so both give the same numbers.

Single-label checkpoints (ImageNet-1k fine-tuning): top-1 / top-5 accuracy.
Multi-label checkpoints (ML-Images): mAP over the classes with at least one
positive (-1 entries ignored), precision / recall / F1 at top-k per class and
per image, and mAP per hierarchy depth (the hierarchy comes from the dataset's
metadata). Each requested image size is one pass with the §7 evaluation
preprocessing (central 80 % crop, bilinear resize), e.g. 224 and 299.

The forward pass is pmapped over the local devices; every process reads its
shard of the split and the logits are gathered, so a multi-host evaluation
gives the same numbers as a single host. Multi-label scores are logits (AP is
invariant under the sigmoid, which would turn confident scores into ties at
1.0) streamed into `metrics.MultiLabelAccumulator`, which spills them to disk
(88,739 x 11,166 is 4 GB), so memory stays bounded. The spilled scores and a
periodic snapshot of the accumulator and the input position make a killed
evaluation resumable. The workdir may be remote (``gs://``); the spilled
scores and the progress then stay on the local disk (`_progress_root`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from mlimages_jax import fileio
from mlimages_jax.data import hierarchy as hierarchy_lib
from mlimages_jax.inference import predict
from mlimages_jax.inputs import pipeline
from mlimages_jax.evaluation import metrics

RESULTS_FILE = "eval_results.json"
PROGRESS_DIR = ".eval-progress"


class EvaluationError(ValueError):
  """The checkpoint and the dataset (or the batch size) do not fit together."""


def _check_classes(model: predict.LoadedModel,
                   info: pipeline.DatasetInfo, checkpoint: str) -> None:
  if model.num_classes != info.num_classes:
    raise EvaluationError(
        f"{checkpoint} predicts {model.num_classes} classes but {info.name} "
        f"({info.label_mode}-label) has {info.num_classes}: a checkpoint of "
        "another dataset")
  for i, (ours, theirs) in enumerate(zip(model.class_ids, info.class_ids)):
    if ours != theirs:
      raise EvaluationError(
          f"{checkpoint} and {info.name} order their classes differently: "
          f"class {i} is {ours!r} in the checkpoint, {theirs!r} in the dataset")


def _hierarchy_depth(dataset: str, data_dir: str | None) -> np.ndarray | None:
  """Depth of each class from the dataset's hierarchy metadata, if it has one."""
  metadata = pipeline.load_builder(dataset, data_dir).info.metadata or {}
  if "parents" not in metadata:
    return None
  return hierarchy_lib.Hierarchy.from_arrays(
      metadata["wnids"], metadata["names"], metadata["parents"]).depth


def _gather(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """Concatenates each array over all processes (a no-op on one host)."""
  flat = tuple(np.asarray(a).reshape(-1, *a.shape[2:]) for a in arrays)
  if jax.process_count() == 1:
    return flat
  return tuple(np.asarray(a) for a in
               multihost_utils.process_allgather(flat, tiled=True))


def _evaluate_size(model: predict.LoadedModel, *, dataset: str,
                   data_dir: str | None, split: str, image_size: int,
                   batch_size: int, top_k: Sequence[int], num_examples: int,
                   preprocess: Mapping[str, Any] | None,
                   depth: np.ndarray | None, progress_dir: pathlib.Path,
                   save_every: int, progress: bool) -> dict[str, Any]:
  """One pass over the split at one image size; resumes from `progress_dir`.

  Every `save_every` batches the accumulator and the input iterator's
  position are saved together in one atomic file, so a killed evaluation
  continues from its last save; the finished result is kept there too until
  the caller has written eval_results.json.
  """
  iterator = pipeline.create_input_iterator(
      dataset=dataset, data_dir=data_dir, split=split,
      global_batch_size=batch_size, image_size=image_size, mode="eval",
      label_mode=model.label_mode, seed=0, preprocess=preprocess,
      process_index=jax.process_index(), process_count=jax.process_count(),
      local_device_count=jax.local_device_count())
  num_batches = iterator.num_batches
  if num_examples > 0:
    num_batches = min(num_batches, math.ceil(num_examples / batch_size))
  fingerprint = json.dumps({
      "checkpoint": model.source, "step": model.metadata["step"],
      "dataset": dataset, "split": split, "image_size": image_size,
      "batch_size": batch_size, "num_batches": num_batches,
      "top_k": list(top_k), "preprocess": dict(preprocess or {}),
      "process_count": jax.process_count()})
  state_file = progress_dir / "state.npz"
  result_file = progress_dir / "result.json"
  done: int | None = 0  # Batches already evaluated; -1: all, None: stale.
  if result_file.exists():
    saved_result = json.loads(result_file.read_text())
    done = -1 if saved_result["fingerprint"] == fingerprint else None
  elif state_file.exists():
    with np.load(state_file) as saved:
      done = (int(saved["batches"])
              if str(saved["fingerprint"]) == fingerprint else None)
  if not _all_processes_agree(done):
    done = None
  if done is None:  # Another evaluation's progress, or processes disagree.
    shutil.rmtree(progress_dir, ignore_errors=True)
    done = 0
  if done == -1:
    return saved_result["result"]
  progress_dir.mkdir(parents=True, exist_ok=True)

  multi = model.label_mode == "multi"
  if multi:
    accumulator = metrics.MultiLabelAccumulator(
        model.num_classes, top_k=top_k, spill_dir=progress_dir / "scores")
  else:
    accumulator = metrics.SingleLabelAccumulator((1, 5))
  if done:
    with np.load(state_file) as saved:
      accumulator.load_state({k: saved[f"acc/{k}"] for k in
                              accumulator.state()})
      iterator.set_state(saved["iterator"].tobytes())
  bar = tqdm(total=num_batches, initial=done, unit="batch",
             disable=not progress, desc=f"eval {image_size}px")

  def consume(logits: Any, batch: Mapping[str, np.ndarray],
              iterator_state: bytes) -> None:
    nonlocal done
    accumulator.update(*_gather(logits, batch["labels"], batch["mask"]))
    done += 1
    bar.update()
    if done % save_every == 0 and done < num_batches:
      arrays = {f"acc/{k}": v for k, v in accumulator.state().items()}
      with fileio.atomic_writer(state_file, "wb") as f:
        np.savez(f, fingerprint=np.array(fingerprint), batches=np.int64(done),
                 iterator=np.frombuffer(iterator_state, np.uint8), **arrays)

  start = time.perf_counter()
  # One batch in flight: the devices compute batch i + 1 while the host
  # ranks batch i.
  pending = None
  for batch in itertools.islice(iterator, num_batches - done):
    logits, _ = model.forward_sharded(batch["image"])
    after = iterator.get_state()
    if pending is not None:
      consume(*pending)
    pending = (logits, batch, after)
  if pending is not None:
    consume(*pending)
  bar.close()
  result = accumulator.result(depth) if multi else accumulator.result()
  seconds = time.perf_counter() - start
  result["decode_failures"] = iterator.decode_failures
  result["seconds"] = round(seconds, 3)
  result["images_per_second"] = round(accumulator.num_examples / seconds, 2)
  result = _json_safe(result)
  with fileio.atomic_writer(result_file) as f:
    json.dump({"fingerprint": fingerprint, "result": result}, f)
  return result


def _all_processes_agree(value: int | None) -> bool:
  """Whether every process would resume from the same point (SPMD lockstep)."""
  if jax.process_count() == 1:
    return True
  code = np.int64(-2 if value is None else value)
  return bool((multihost_utils.process_allgather(code) == code).all())


def _json_safe(value: Any) -> Any:
  """NaN (an undefined AP) -> null, so the file is standard JSON."""
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, Mapping):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def evaluate_checkpoint(checkpoint: str | os.PathLike[str],
                        **kwargs: Any) -> dict[str, Any]:
  """Evaluates the checkpoint at `checkpoint` (any kind `LoadedModel` reads,
  local or ``gs://``); the arguments are those of `evaluate_model`.

  What it writes (eval_results.json, the progress) may not overlap the
  checkpoint (OverlapError).
  """
  workdir = fileio.as_path(kwargs["workdir"])
  fileio.check_disjoint({"--checkpoint": checkpoint}, {
      "--workdir": workdir / RESULTS_FILE,
      "--workdir (progress)": _progress_root(workdir)})
  return evaluate_model(predict.LoadedModel.load(checkpoint), **kwargs)


def evaluate_model(model: predict.LoadedModel, *, dataset: str,
                   data_dir: str | None = None, split: str = "validation",
                   image_size: int | Sequence[int] | None = None,
                   batch_size: int = 64, workdir: str | os.PathLike[str],
                   top_k: Sequence[int] = (1, 5, 10), num_examples: int = 0,
                   preprocess: Mapping[str, Any] | None = None,
                   save_every: int = 50,
                   progress: bool = True) -> dict[str, Any]:
  """Evaluates `model` on `dataset`/`split`; writes eval_results.json.

  The one evaluation path: `mlimages evaluate` and the training loop's
  evaluations both run it. `image_size` is one size or several (one pass
  each; default: the size the checkpoint was trained at). `batch_size` is
  global (all processes) and must be divisible by the number of devices.
  `num_examples` > 0 evaluates only the first examples (a quick look).
  `preprocess` overrides the evaluation preprocessing (`PreprocessConfig`).
  `workdir` may be local or remote (``gs://...``). Progress is saved every
  `save_every` batches in `_progress_root(workdir)`: rerunning a killed
  evaluation with the same arguments resumes it. Returns what it wrote, plus
  "path".
  """
  if batch_size % jax.device_count():
    raise EvaluationError(f"batch size {batch_size} is not divisible by the "
                          f"{jax.device_count()} devices")
  try:
    info = pipeline.dataset_info(dataset, data_dir,
                                 label_mode=model.label_mode)
  except ValueError as e:  # E.g. no multi-label targets in the dataset.
    raise EvaluationError(f"{model.source} ({model.label_mode}-label) cannot "
                          f"be evaluated on {dataset}: {e}") from e
  _check_classes(model, info, model.source)
  if split not in info.split_sizes:
    raise EvaluationError(f"{dataset} has no split {split!r} (splits: "
                          f"{sorted(info.split_sizes)})")
  sizes = ([model.image_size] if image_size is None else
           [image_size] if isinstance(image_size, int) else list(image_size))
  depth = (_hierarchy_depth(dataset, data_dir) if model.label_mode == "multi"
           else None)
  workdir = fileio.as_path(workdir)
  progress_root = _progress_root(workdir)
  results = {
      "checkpoint": model.source,
      "step": model.metadata["step"],
      "dataset": info.name, "split": split,
      "label_mode": model.label_mode,
      "num_classes": model.num_classes,
      "model": model.metadata["model"],
      "class_ids": list(model.class_ids),
      "results": {},
  }
  progress_dirs = [progress_root / f"{split}-{size}px" for size in sizes]
  for size, progress_dir in zip(sizes, progress_dirs):
    results["results"][str(size)] = _evaluate_size(
        model, dataset=dataset, data_dir=data_dir, split=split,
        image_size=int(size), batch_size=batch_size, top_k=top_k,
        num_examples=num_examples, preprocess=preprocess, depth=depth,
        progress_dir=progress_dir / f"process_{jax.process_index()}",
        save_every=save_every, progress=progress)
  results = _json_safe(results)
  path = workdir / RESULTS_FILE
  if jax.process_index() == 0:
    with fileio.atomic_writer(path) as f:
      json.dump(results, f, indent=1)
  if jax.process_count() > 1:  # Keep the progress until the file exists.
    multihost_utils.sync_global_devices("eval_results.json written")
  for progress_dir in progress_dirs:
    shutil.rmtree(progress_dir / f"process_{jax.process_index()}")
  with contextlib.suppress(OSError):  # Left to the last process to finish.
    for progress_dir in progress_dirs:
      os.rmdir(progress_dir)
    os.rmdir(progress_root)
  return {**results, "path": str(path)}


def _progress_root(workdir: epath.Path) -> pathlib.Path:
  """Where the spilled scores and the progress live: always a local disk.

  The accumulator memory-maps its spilled scores, so they need a local
  filesystem: ``<workdir>/.eval-progress`` for a local workdir; for a remote
  one (``gs://``), a directory of the local temp dir named after the
  workdir, so a killed evaluation resumes when rerun on the same machine
  (on a fresh machine it starts over; the results still go to `workdir`).
  """
  if not fileio.is_remote(workdir):
    return pathlib.Path(workdir) / PROGRESS_DIR
  digest = hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
  return pathlib.Path(tempfile.gettempdir()) / f"mlimages{PROGRESS_DIR}-{digest}"


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
  """The headline numbers of `evaluate_checkpoint`'s results (no per-class)."""
  return {
      "checkpoint": results["checkpoint"], "step": results["step"],
      "dataset": results["dataset"], "split": results["split"],
      "results": {size: {k: v for k, v in r.items() if k != "per_class"}
                  for size, r in results["results"].items()},
  }
