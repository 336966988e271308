"""Evaluation metrics: exact average precision, top-k P/R/F1 and accuracy.

Label convention (the ML-Images annotation format): an entry > 0 is a
positive, 0 a negative and < 0 "ignore this class for this image". Ignored
entries are removed before ranking, for average precision and for top-k
alike, so they count neither as hits nor as misses.

Average precision follows scikit-learn's definition exactly (the area under
the step-wise precision-recall curve, ties sharing one threshold):
``AP = (1/P) * sum over positives i of TP(>= s_i) / N(>= s_i)``, where
``TP(>= s)`` and ``N(>= s)`` count the positives and the non-ignored entries
scoring at least ``s``. Written this way, only the sorted scores of a class and
its few positives are needed, so a class costs one SIMD sort of its column.

The full ML-Images validation set (88,739 images x 11,166 classes) has 4 GB of
float32 scores, so :class:`MultiLabelAccumulator` never holds them as one
array: it keeps class-major blocks of rows (optionally spilled to disk), labels as sparse non-zero entries, and computes AP by class chunks.
No JAX or TensorFlow here: metrics run on the host on NumPy arrays.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Class chunks are sized so one chunk of scores is about this many bytes.
_CHUNK_BYTES = 1 << 24
# Rows per step of the blocked (cache-friendly) transpose of [N, C] scores.
_TRANSPOSE_ROWS = 256
_scratch_local = threading.local()


def _scratch(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
  """A per-thread reusable buffer: fresh multi-MB arrays cost page faults."""
  dtype = np.dtype(dtype)
  size = shape[0] * shape[1]
  flat = getattr(_scratch_local, dtype.name, None)
  if flat is None or flat.size < size:
    flat = np.empty(size, dtype)
    setattr(_scratch_local, dtype.name, flat)
  return flat[:size].reshape(shape)


def _check_finite(scores: np.ndarray) -> None:
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN; average precision is undefined")


def _count_at_least(classes: np.ndarray, values: np.ndarray) -> np.ndarray:
  """For entries sorted by (class, value): how many of the class are >= each."""
  starts_group = np.ones(classes.size, bool)
  starts_group[1:] = ((classes[1:] != classes[:-1])
                      | (values[1:] != values[:-1]))
  first_of_tie = np.maximum.accumulate(
      np.where(starts_group, np.arange(classes.size), 0))
  return np.searchsorted(classes, classes, side="right") - first_of_tie


def _chunk_average_precision(ranked: np.ndarray, classes: np.ndarray,
                             values: np.ndarray,
                             positive: np.ndarray) -> np.ndarray:
  """AP of each row of class-major scores ``ranked`` [Cc, N]; NaN if P = 0.

  ``classes``, ``values`` and ``positive`` describe the chunk's non-zero label
  entries (row in the chunk, score, label > 0 rather than < 0). ``ranked`` is
  sorted in place: afterwards only the scores of the positives and of the
  ignored entries are needed, and those are in ``values``.
  """
  ranked.sort(axis=1)
  if ranked.size and np.isnan(ranked[:, -1]).any():  # NaN sorts last.
    raise ValueError("scores contain NaN; average precision is undefined")
  # Order the entries by (class, value): a quicksort by value (the order of
  # ties is irrelevant, they are counted as groups) then a stable radix sort
  # by class, 3x faster than np.lexsort.
  order = np.argsort(values)
  narrow = classes[order].astype(np.min_scalar_type(len(ranked)))
  order = order[np.argsort(narrow, kind="stable")]
  classes, values, positive = classes[order], values[order], positive[order]
  # Labelled entries (positive or ignored) of the class scoring >= each.
  labelled_ge = _count_at_least(classes, values)[positive]
  classes, values = classes[positive], values[positive]
  pos_ge = _count_at_least(classes, values)
  # All entries of the class scoring >= each positive, from the sorted row:
  # one binary search per class, the only per-class Python step.
  all_ge = np.empty(classes.size, np.int64)
  bounds = np.searchsorted(classes, np.arange(len(ranked) + 1))
  for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
    lo, hi = bounds[c], bounds[c + 1]
    all_ge[lo:hi] = ranked.shape[1] - np.searchsorted(
        ranked[c], values[lo:hi], side="left")
  # Non-ignored entries >= s: all of them less the ignored ones.
  num_ge = all_ge - (labelled_ge - pos_ge)
  num_pos = np.bincount(classes, minlength=len(ranked))
  sums = np.bincount(classes, weights=pos_ge / num_ge, minlength=len(ranked))
  with np.errstate(invalid="ignore"):
    return sums / np.where(num_pos > 0, num_pos, np.nan)


def _class_chunk(num_examples: int) -> int:
  return max(1, _CHUNK_BYTES // (4 * max(num_examples, 1)))


def _average_precision_by_chunks(
    fill: Callable[[np.ndarray, int, int], None], dtype: np.dtype,
    num_classes: int, num_examples: int, rows: np.ndarray, classes: np.ndarray,
    positive: np.ndarray, num_threads: int | None) -> np.ndarray:
  """Per-class AP, one chunk of classes at a time on `num_threads` threads.

  ``fill(out, c0, c1)`` writes the scores of classes [c0, c1) class-major into
  ``out`` [c1 - c0, N]; (rows, classes, positive) are the non-zero label
  entries. NumPy's sort and copies release the GIL, so threads scale the work
  (default: one per CPU core).
  """
  # Group the entries by class (a stable radix sort on a narrow type).
  order = np.argsort(classes.astype(np.min_scalar_type(num_classes)),
                     kind="stable")
  rows, classes, positive = rows[order], classes[order], positive[order]

  def chunk(c0: int) -> np.ndarray:
    c1 = min(c0 + step, num_classes)
    ranked = _scratch((c1 - c0, num_examples), dtype)
    fill(ranked, c0, c1)
    lo, hi = np.searchsorted(classes, [c0, c1])
    chunk_classes = classes[lo:hi] - c0
    return _chunk_average_precision(
        ranked, chunk_classes, ranked[chunk_classes, rows[lo:hi]],
        positive[lo:hi])

  step = _class_chunk(num_examples)
  starts = range(0, num_classes, step)
  workers = max(1, min(len(starts), num_threads or os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return np.concatenate([np.empty(0)] + list(pool.map(chunk, starts)))


def average_precision(scores: np.ndarray, labels: np.ndarray, *,
                      num_threads: int | None = None) -> np.ndarray:
  """Per-class AP [C] of ``scores``/``labels`` [N, C] (NaN where no positive)."""
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if scores.ndim != 2 or scores.shape != labels.shape:
    raise ValueError(f"scores {scores.shape} and labels {labels.shape} must "
                     "both be [num_examples, num_classes]")
  if not np.issubdtype(scores.dtype, np.floating):
    scores = scores.astype(np.float64)
  num_examples, num_classes = scores.shape

  def transpose(out: np.ndarray, c0: int, c1: int) -> None:
    for r in range(0, num_examples, _TRANSPOSE_ROWS):
      np.copyto(out[:, r:r + _TRANSPOSE_ROWS],
                scores[r:r + _TRANSPOSE_ROWS, c0:c1].T)

  rows, classes = np.divmod(np.flatnonzero(labels != 0), num_classes)
  return _average_precision_by_chunks(
      transpose, scores.dtype, num_classes, num_examples, rows, classes,
      labels[rows, classes] > 0, num_threads)


def mean_of_defined(values: np.ndarray) -> float:
  """Mean over the non-NaN entries (classes with >= 1 positive); NaN if none."""
  values = np.asarray(values, np.float64)
  defined = ~np.isnan(values)
  return float(values[defined].mean()) if defined.any() else float("nan")


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """mAP over the classes with at least one positive (labels > 0)."""
  return mean_of_defined(average_precision(scores, labels))


def map_by_depth(ap: np.ndarray, depth: np.ndarray) -> dict[int, dict[str, Any]]:
  """mAP per hierarchy depth: {depth: {"map", "num_classes"}} (defined APs only)."""
  ap = np.asarray(ap, np.float64)
  depth = np.asarray(depth)
  if ap.shape != depth.shape:
    raise ValueError(f"ap {ap.shape} and depth {depth.shape} differ")
  result = {}
  for d in np.unique(depth):
    values = ap[(depth == d) & ~np.isnan(ap)]
    if values.size:
      result[int(d)] = {"map": float(values.mean()),
                        "num_classes": int(values.size)}
  return result


def _ranked_top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest scores per row, highest first.

  One partition for the largest k; every smaller k is then a prefix.
  """
  k = min(k, scores.shape[1])
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1,
                     kind="stable")
  return np.take_along_axis(top, order, axis=1)


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
  """Harmonic mean, 0 where precision and recall are both 0."""
  total = np.asarray(precision + recall, np.float64)
  return np.divide(2 * precision * recall, total, out=np.zeros_like(total),
                   where=total > 0)


def _prf(tp: np.ndarray, predicted: np.ndarray,
         actual: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Precision, recall and F1 elementwise, 0 where undefined."""
  tp = tp.astype(np.float64)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp),
                        where=predicted > 0)
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
  return precision, recall, _f1(precision, recall)


class MultiLabelAccumulator:
  """Streams [batch, classes] scores and labels; computes AP and top-k metrics.

  Memory stays bounded for any number of examples: scores are kept as
  class-major blocks of ``block_rows`` rows (in ``spill_dir`` as raw float32
  files when given, else in memory), labels as their non-zero entries, and AP
  is computed one chunk of classes at a time. Top-k counts are updated per
  batch. Scores are stored as float32: pass logits, not sigmoid outputs, so
  that confident scores do not collapse into ties at 1.0.
  """

  def __init__(self, num_classes: int, *, top_k: Sequence[int] = (1, 5, 10),
               spill_dir: str | os.PathLike[str] | None = None,
               block_rows: int = 2048):
    self.num_classes = int(num_classes)
    self.top_k = tuple(int(k) for k in top_k)
    if any(k < 1 for k in self.top_k):
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    self._spill_dir = None if spill_dir is None else os.fspath(spill_dir)
    if self._spill_dir is not None:
      os.makedirs(self._spill_dir, exist_ok=True)
    self._block_rows = int(block_rows)
    self._buffer = np.empty((self._block_rows, self.num_classes), np.float32)
    self._buffered = 0
    self._blocks: list[np.ndarray | str] = []  # Arrays or spilled files.
    self._block_sizes: list[int] = []
    self._label_rows: list[np.ndarray] = []
    self._label_cols: list[np.ndarray] = []
    self._label_positive: list[np.ndarray] = []
    self.num_examples = 0
    self._pos_count = np.zeros(self.num_classes, np.int64)
    self._tp = {k: np.zeros(self.num_classes, np.int64) for k in self.top_k}
    self._predicted = {k: np.zeros(self.num_classes, np.int64)
                       for k in self.top_k}
    self._image_sums = {k: np.zeros(3) for k in self.top_k}
    self._images_with_positive = 0

  def update(self, scores: np.ndarray, labels: np.ndarray,
             mask: np.ndarray | None = None) -> None:
    """Adds a batch; rows with ``mask == 0`` (padding) are dropped.

    Scores are stored as float32 (exact for float32 logits).
    """
    scores = np.asarray(scores, np.float32).reshape(-1, self.num_classes)
    labels = np.asarray(labels).reshape(-1, self.num_classes)
    if mask is not None:
      keep = np.asarray(mask).reshape(-1) > 0
      scores, labels = scores[keep], labels[keep]
    if scores.shape != labels.shape:
      raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ")
    _check_finite(scores)
    self._update_top_k(scores, labels)
    rows, cols = np.divmod(np.flatnonzero(labels != 0), self.num_classes)
    self._label_rows.append((rows + self.num_examples).astype(np.int64))
    self._label_cols.append(cols)
    self._label_positive.append(labels[rows, cols] > 0)
    self.num_examples += scores.shape[0]
    start = 0
    while start < scores.shape[0]:
      take = min(self._block_rows - self._buffered, scores.shape[0] - start)
      self._buffer[self._buffered:self._buffered + take] = (
          scores[start:start + take])
      self._buffered += take
      start += take
      if self._buffered == self._block_rows:
        self._flush()

  def _update_top_k(self, scores: np.ndarray, labels: np.ndarray) -> None:
    positive = labels > 0
    self._pos_count += positive.sum(axis=0)
    ranked = np.where(labels < 0, -np.inf, scores)
    num_pos = positive.sum(axis=1)
    has_pos = num_pos > 0
    self._images_with_positive += int(has_pos.sum())
    rows = np.arange(scores.shape[0])[:, None]
    ranked_top = _ranked_top_k(ranked, max(self.top_k))
    for k in self.top_k:
      top = ranked_top[:, :k]
      hits = positive[rows, top]
      np.add.at(self._predicted[k], top.reshape(-1), 1)
      np.add.at(self._tp[k], top[hits], 1)
      precision, recall, f1 = _prf(hits.sum(axis=1),
                                   np.full(len(top), top.shape[1]), num_pos)
      self._image_sums[k] += [precision[has_pos].sum(), recall[has_pos].sum(),
                              f1[has_pos].sum()]

  def _flush(self) -> None:
    if not self._buffered:
      return
    block = np.ascontiguousarray(self._buffer[:self._buffered].T)
    if self._spill_dir is None:
      self._blocks.append(block)
    else:
      path = self._block_path(len(self._blocks))
      block.tofile(path)
      self._blocks.append(path)
    self._block_sizes.append(self._buffered)
    self._buffered = 0

  def _block_path(self, i: int) -> str:
    return os.path.join(self._spill_dir, f"scores_{i:06d}.f32")

  def _read_block(self, i: int, c0: int, c1: int) -> np.ndarray:
    """Classes [c0, c1) of block i, [c1 - c0, rows].

    Spilled blocks are read with plain reads, not memory maps, whose pages
    would count as resident memory until the whole file had been touched.
    """
    block, rows = self._blocks[i], self._block_sizes[i]
    if not isinstance(block, str):
      return block[c0:c1]
    return np.fromfile(block, np.float32, count=(c1 - c0) * rows,
                       offset=c0 * rows * 4).reshape(c1 - c0, rows)

  def average_precision(self, *, num_threads: int | None = None) -> np.ndarray:
    """Per-class AP [C] over everything added so far (NaN where no positive)."""
    self._flush()
    starts = np.cumsum([0] + self._block_sizes)

    def read(out: np.ndarray, c0: int, c1: int) -> None:
      for i in range(len(self._blocks)):
        out[:, starts[i]:starts[i + 1]] = self._read_block(i, c0, c1)

    return _average_precision_by_chunks(
        read, np.dtype(np.float32), self.num_classes, self.num_examples,
        np.concatenate([np.empty(0, np.int64)] + self._label_rows),
        np.concatenate([np.empty(0, np.int64)] + self._label_cols),
        np.concatenate([np.empty(0, bool)] + self._label_positive),
        num_threads)

  def state(self) -> dict[str, np.ndarray]:
    """Everything but the spilled score files, as arrays (for a resumable run).

    Only a spilling accumulator has a state: its scores are on disk. The
    files of blocks added after a state was taken are rewritten when a
    restored accumulator gets there again.
    """
    if self._spill_dir is None:
      raise ValueError("only an accumulator with a spill_dir can be saved")
    self._flush()
    return {
        "num_classes": np.int64(self.num_classes),
        "top_k": np.array(self.top_k, np.int64),
        "num_examples": np.int64(self.num_examples),
        "block_sizes": np.array(self._block_sizes, np.int64),
        "label_rows": np.concatenate([np.empty(0, np.int64)]
                                     + self._label_rows),
        "label_cols": np.concatenate([np.empty(0, np.int64)]
                                     + self._label_cols),
        "label_positive": np.concatenate([np.empty(0, bool)]
                                         + self._label_positive),
        "pos_count": self._pos_count,
        "tp": np.stack([self._tp[k] for k in self.top_k]),
        "predicted": np.stack([self._predicted[k] for k in self.top_k]),
        "image_sums": np.stack([self._image_sums[k] for k in self.top_k]),
        "images_with_positive": np.int64(self._images_with_positive),
    }

  def load_state(self, state: Mapping[str, np.ndarray]) -> None:
    """Continues from `state()` of an accumulator with the same settings."""
    if (int(state["num_classes"]) != self.num_classes
        or tuple(state["top_k"].tolist()) != self.top_k):
      raise ValueError("the saved accumulator has other classes or top-k")
    sizes = state["block_sizes"].tolist()
    paths = [self._block_path(i) for i in range(len(sizes))]
    for path, rows in zip(paths, sizes):
      if (not os.path.isfile(path)
          or os.path.getsize(path) != rows * self.num_classes * 4):
        raise ValueError(f"{path}: spilled scores missing or truncated")
    self._blocks, self._block_sizes, self._buffered = paths, sizes, 0
    self.num_examples = int(state["num_examples"])
    self._label_rows = [state["label_rows"]]
    self._label_cols = [state["label_cols"]]
    self._label_positive = [state["label_positive"]]
    self._pos_count = state["pos_count"].copy()
    for i, k in enumerate(self.top_k):
      self._tp[k] = state["tp"][i].copy()
      self._predicted[k] = state["predicted"][i].copy()
      self._image_sums[k] = state["image_sums"][i].copy()
    self._images_with_positive = int(state["images_with_positive"])

  def top_k_per_class(self, k: int) -> dict[str, np.ndarray]:
    """Per-class precision/recall/F1 [C] at top-k, plus the raw counts."""
    precision, recall, f1 = _prf(self._tp[k], self._predicted[k],
                                 self._pos_count)
    return {"precision": precision, "recall": recall, "f1": f1,
            "true_positives": self._tp[k], "predicted": self._predicted[k],
            "positives": self._pos_count}

  def result(self, depth: np.ndarray | None = None) -> dict[str, Any]:
    """Summary metrics (and per-class arrays under "per_class") as plain Python.

    Per class at k: P = hits / times predicted, R = hits / positives, averaged
    over classes with >= 1 positive ("macro"; F1 from the averaged P and R, as
    the multi-label literature's CF1), plus the pooled "overall" P/R/F1. Per
    image: P = hits / k, R = hits / positives, F1, averaged over images with
    >= 1 positive.
    """
    ap = self.average_precision()
    has_pos = self._pos_count > 0
    summary: dict[str, Any] = {
        "num_examples": self.num_examples,
        "num_classes": self.num_classes,
        "num_classes_with_positives": int(has_pos.sum()),
        "num_images_with_positives": self._images_with_positive,
        "map": mean_of_defined(ap),
    }
    per_class: dict[str, list[float]] = {"ap": ap.tolist()}
    for k in self.top_k:
      counts = self.top_k_per_class(k)
      macro_p = float(counts["precision"][has_pos].mean()) if has_pos.any() else 0.0
      macro_r = float(counts["recall"][has_pos].mean()) if has_pos.any() else 0.0
      overall = _prf(np.array([counts["true_positives"].sum()]),
                     np.array([counts["predicted"].sum()]),
                     np.array([counts["positives"].sum()]))
      macro_f1 = float(_f1(np.float64(macro_p), np.float64(macro_r)))
      n = max(self._images_with_positive, 1)
      image_p, image_r, image_f1 = self._image_sums[k] / n
      summary[f"top{k}"] = {
          "per_class": {"precision": macro_p, "recall": macro_r,
                        "f1": macro_f1},
          "overall": {"precision": float(overall[0][0]),
                      "recall": float(overall[1][0]),
                      "f1": float(overall[2][0])},
          "per_image": {"precision": float(image_p), "recall": float(image_r),
                        "f1": float(image_f1)},
      }
      for name in ("precision", "recall", "f1"):
        per_class[f"{name}@{k}"] = counts[name].tolist()
    if depth is not None:
      summary["map_by_depth"] = {str(d): v for d, v in
                                 map_by_depth(ap, depth).items()}
    summary["per_class"] = per_class
    return summary


def top_k_correct(scores: np.ndarray, labels: np.ndarray,
                  k: int) -> np.ndarray:
  """Whether each example's true class is among its k highest scores.

  The rank is the number of classes scoring strictly higher than the true
  one, so ties resolve in the model's favour deterministically.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels, np.int64)
  true_scores = np.take_along_axis(scores, labels[:, None], axis=1)
  return (scores > true_scores).sum(axis=1) < k


class SingleLabelAccumulator:
  """Streams [batch, classes] scores and int labels; top-k accuracy."""

  def __init__(self, top_k: Iterable[int] = (1, 5)):
    self.top_k = tuple(int(k) for k in top_k)
    self.num_examples = 0
    self._correct = {k: 0 for k in self.top_k}

  def update(self, scores: np.ndarray, labels: np.ndarray,
             mask: np.ndarray | None = None) -> None:
    scores = np.asarray(scores)
    scores = scores.reshape(-1, scores.shape[-1])
    labels = np.asarray(labels).reshape(-1)
    if mask is not None:
      keep = np.asarray(mask).reshape(-1) > 0
      scores, labels = scores[keep], labels[keep]
    self.num_examples += len(labels)
    for k in self.top_k:
      self._correct[k] += int(top_k_correct(scores, labels, k).sum())

  def state(self) -> dict[str, np.ndarray]:
    return {"top_k": np.array(self.top_k, np.int64),
            "num_examples": np.int64(self.num_examples),
            "correct": np.array([self._correct[k] for k in self.top_k],
                                np.int64)}

  def load_state(self, state: Mapping[str, np.ndarray]) -> None:
    if tuple(state["top_k"].tolist()) != self.top_k:
      raise ValueError("the saved accumulator has other top-k")
    self.num_examples = int(state["num_examples"])
    self._correct = dict(zip(self.top_k, state["correct"].tolist()))

  def result(self) -> dict[str, Any]:
    n = max(self.num_examples, 1)
    return {"num_examples": self.num_examples,
            **{f"top{k}": self._correct[k] / n for k in self.top_k}}
