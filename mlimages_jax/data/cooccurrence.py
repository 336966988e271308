"""ImageNet x Open Images co-occurrence (ML-Images §3.3).

The original ran a model trained on Open Images alone over the single-label
ImageNet images and, for strongly co-occurring pairs (ImageNet class i, Open
Images class j), gave every image of i the tag j. Its normalisation and
threshold were never published, so here they are explicit, configurable
rules (`CooccurrenceRules`) with these defaults:

- normalisation: ``mean_score[i, j]`` = mean sigmoid score of column j over
  the images of ImageNet class i, i.e. how often a photo of i shows j (the
  rows of the co-occurrence matrix are normalised by the class's image count);
- ``lift[i, j] = mean_score[i, j] / mean over all images of column j``, so a
  tag the model fires on everywhere (a generic "plant", a model bias) is not
  attached to every class;
- a pair is kept when the class has at least `min_images` images (support),
  ``mean_score >= threshold`` and ``lift >= min_lift``, and the target is not
  the source or one of its ancestors (the closure adds those anyway); at most
  `top_k` targets per class, the highest mean scores first;
- the tag is added with confidence ``min(source confidence, pair confidence)``
  where the pair confidence is the mean score rounded to 2 decimals, like the
  0.8/0.9 confidences of the release.

The score matrix (images x Open Images classes) is streamed in row chunks, so
an `np.load(..., mmap_mode="r")` array of any size works.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from mlimages_jax.data import annotation_reader
from mlimages_jax.data import annotations
from mlimages_jax import fileio
from mlimages_jax.fileio import PathLike, atomic_writer
from mlimages_jax.data.hierarchy import Hierarchy
from mlimages_jax.data.hierarchy import ragged_arange

PAIRS_FILE_NAME = "cooccurrence_pairs.tsv"
_COLUMNS = ("source_index", "source_wnid", "target_index", "target_wnid",
            "confidence", "mean_score", "lift", "support")


@dataclasses.dataclass(frozen=True)
class CooccurrenceRules:
  """How strong pairs are selected (see the module docstring)."""

  threshold: float = 0.5
  min_lift: float = 2.0
  top_k: int = 5
  min_images: int = 20


@dataclasses.dataclass(frozen=True)
class CooccurrenceMatrix:
  """Normalised co-occurrence of ImageNet classes (rows) and score columns."""

  classes: np.ndarray  # int32 [S]: ML-Images index of each row.
  counts: np.ndarray  # int64 [S]: images of each row's class.
  mean_scores: np.ndarray  # float64 [S, K]
  overall_mean: np.ndarray  # float64 [K]: mean of each column over all images.
  columns: np.ndarray  # int32 [K]: ML-Images index of each score column.

  @property
  def lift(self) -> np.ndarray:
    return self.mean_scores / np.maximum(self.overall_mean, 1e-12)


def cooccurrence_matrix(scores: np.ndarray, image_classes: np.ndarray,
                        columns: np.ndarray, *, chunk_rows: int = 16384,
                        progress: Callable[[int], None] | None = None
                        ) -> CooccurrenceMatrix:
  """Streams `scores` [N, K] and averages them per image class.

  `image_classes[n]` is the ML-Images index of image n's ImageNet class, or
  -1 to leave the image out. Memory: O(classes x K), not O(N).
  """
  num_images, num_columns = scores.shape
  image_classes = np.asarray(image_classes)
  if image_classes.shape != (num_images,):
    raise ValueError(f"{len(image_classes)} image classes for a score matrix "
                     f"of {num_images} rows")
  if len(columns) != num_columns:
    raise ValueError(f"{len(columns)} column classes for {num_columns} score "
                     "columns")
  classes, compact = np.unique(image_classes, return_inverse=True)
  offset = int(classes.size and classes[0] < 0)  # Row 0 holds class -1.
  sums = np.zeros((classes.size, num_columns))
  total = np.zeros(num_columns)
  for start in range(0, num_images, chunk_rows):
    block = np.asarray(scores[start:start + chunk_rows], np.float64)
    chunk_ids = compact[start:start + chunk_rows]
    order = np.argsort(chunk_ids, kind="stable")
    ids = chunk_ids[order]
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    sums[ids[first]] += np.add.reduceat(block[order], first, axis=0)
    total += block[chunk_ids >= offset].sum(axis=0)
    if progress is not None:
      progress(min(start + chunk_rows, num_images))
  counts = np.bincount(compact, minlength=classes.size)[offset:]
  kept = counts > 0
  used = max(int(counts.sum()), 1)
  return CooccurrenceMatrix(
      classes=classes[offset:][kept].astype(np.int32),
      counts=counts[kept].astype(np.int64),
      mean_scores=sums[offset:][kept] / counts[kept, None],
      overall_mean=total / used,
      columns=np.asarray(columns, np.int32))


@dataclasses.dataclass(frozen=True)
class CooccurrencePairs:
  """Source class -> (target class, confidence) pairs, CSR by source."""

  num_classes: int
  sources: np.ndarray  # int32, ascending.
  targets: np.ndarray  # int32
  confidences: np.ndarray  # float32
  mean_scores: np.ndarray | None = None
  lifts: np.ndarray | None = None
  supports: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.sources)

  @property
  def indptr(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(
        self.sources, minlength=self.num_classes))]).astype(np.int64)

  def expand_batch(self, indptr: np.ndarray, indices: np.ndarray,
                   confidences: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adds the targets of every positively annotated source class (CSR)."""
    num_rows = len(indptr) - 1
    rows = np.repeat(np.arange(num_rows), np.diff(indptr))
    positive = np.flatnonzero(confidences > 0)
    pair_ptr = self.indptr
    sources = indices[positive]
    counts = pair_ptr[sources + 1] - pair_ptr[sources]
    if not counts.any():
      return indptr, indices, confidences
    pair = ragged_arange(pair_ptr[sources], counts)
    added = np.minimum(np.repeat(confidences[positive], counts),
                       self.confidences[pair])
    return annotations.reduce_max(
        np.concatenate([rows, np.repeat(rows[positive], counts)]),
        np.concatenate([indices, self.targets[pair]]),
        np.concatenate([confidences, added]), num_rows, self.num_classes)

  def save(self, path: PathLike, hierarchy: Hierarchy,
           rules: CooccurrenceRules | None = None) -> None:
    """Writes the TSV (atomic): a comment with the rules, a header, rows."""
    with atomic_writer(path, "w", encoding="utf-8", newline="\n") as f:
      if rules is not None:
        f.write(f"# ML-Images co-occurrence pairs; rules: "
                f"{dataclasses.asdict(rules)}\n")
      f.write("\t".join(_COLUMNS) + "\n")
      nan = np.full(len(self), np.nan)
      for s, t, c, m, l, n in zip(
          self.sources.tolist(), self.targets.tolist(),
          self.confidences.tolist(),
          (nan if self.mean_scores is None else self.mean_scores).tolist(),
          (nan if self.lifts is None else self.lifts).tolist(),
          (np.zeros(len(self), int) if self.supports is None
           else self.supports).tolist()):
        f.write(f"{s}\t{hierarchy.wnids[s]}\t{t}\t{hierarchy.wnids[t]}\t"
                f"{annotations.format_confidence(c)}\t{m:.4f}\t{l:.3f}\t{n}\n")


def select_pairs(matrix: CooccurrenceMatrix, hierarchy: Hierarchy,
                 rules: CooccurrenceRules = CooccurrenceRules()
                 ) -> CooccurrencePairs:
  """Applies `rules` to the matrix (see the module docstring)."""
  mean, lift = matrix.mean_scores, matrix.lift
  strong = ((mean >= rules.threshold) & (lift >= rules.min_lift)
            & (matrix.counts[:, None] >= rules.min_images))
  rows, cols = np.nonzero(strong)
  sources, targets = matrix.classes[rows], matrix.columns[cols]
  redundant = (sources == targets) | _is_ancestor(hierarchy, targets, sources)
  rows, cols, sources, targets = (a[~redundant] for a in (rows, cols, sources,
                                                          targets))
  # Highest mean score first within each source; keep the first top_k.
  order = np.lexsort((cols, -mean[rows, cols], sources))
  rows, cols, sources, targets = (a[order] for a in (rows, cols, sources,
                                                     targets))
  first = np.searchsorted(sources, sources, side="left")
  rank = np.arange(len(sources)) - first
  keep = rank < rules.top_k
  rows, cols, sources, targets = (a[keep] for a in (rows, cols, sources,
                                                    targets))
  # Two sources can map several columns to one target: keep the best.
  pick = np.lexsort((-mean[rows, cols], targets, sources))
  unique = np.ones(len(pick), bool)
  unique[1:] = ((np.diff(sources[pick]) != 0)
                | (np.diff(targets[pick]) != 0))
  pick = np.sort(pick[unique])
  rows, cols, sources, targets = (a[pick] for a in (rows, cols, sources,
                                                    targets))
  conf = np.round(mean[rows, cols], 2).astype(np.float32)
  return CooccurrencePairs(
      num_classes=hierarchy.num_classes, sources=sources.astype(np.int32),
      targets=targets.astype(np.int32), confidences=conf,
      mean_scores=mean[rows, cols], lifts=lift[rows, cols],
      supports=matrix.counts[rows])


def _is_ancestor(hierarchy: Hierarchy, candidates: np.ndarray,
                 of: np.ndarray) -> np.ndarray:
  """Elementwise: is candidates[k] an ancestor of of[k]?"""
  ptr = hierarchy.ancestor_indptr
  counts = ptr[of + 1] - ptr[of]
  chain = hierarchy.ancestor_indices[ragged_arange(ptr[of], counts)]
  hit = chain == np.repeat(candidates, counts)
  owner = np.repeat(np.arange(len(of)), counts)
  return np.bincount(owner[hit], minlength=len(of)) > 0


def image_classes(path: PathLike, hierarchy: Hierarchy, *,
                  skip_invalid: bool = False) -> np.ndarray:
  """Each line's most specific (deepest) positive class, or -1 if none.

  Single-label ImageNet lists give their one class; lists already closed over
  the hierarchy give back the leaf they were built from.
  """
  out = []
  depth = hierarchy.depth.astype(np.int64)
  for batch in annotation_reader.AnnotationReader(
      path, num_classes=hierarchy.num_classes,
      skip_invalid=skip_invalid).batches():
    rows = np.repeat(np.arange(len(batch)), np.diff(batch.indptr))
    positive = batch.confidences > 0
    best = np.full(len(batch), -1, np.int64)
    packed = (depth[batch.indices] << 32) | batch.indices
    np.maximum.at(best, rows[positive], packed[positive])
    out.append(np.where(best >= 0, best & 0xFFFFFFFF, -1).astype(np.int32))
  return np.concatenate(out) if out else np.zeros(0, np.int32)


def load_cooccurrence_pairs(path: PathLike, num_classes: int
                            ) -> CooccurrencePairs:
  """Reads `cooccurrence_pairs.tsv`; errors name file and line.

  Needs the columns source_index, target_index and confidence (by header
  name, or the first three columns of a headerless file). ``#`` lines are
  comments.
  """
  source = str(path)
  columns = None
  sources, targets, confs = [], [], []
  with fileio.open_text(path, annotations.LabelError) as f:
    for lineno, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not line.strip() or line.startswith("#"):
        continue
      fields = line.split("\t")
      if columns is None and fields[0] == "source_index":
        try:
          columns = [fields.index(c) for c in ("source_index", "target_index",
                                               "confidence")]
        except ValueError:
          raise annotations.LabelError(
              source, lineno, "the header must name source_index, "
              "target_index and confidence") from None
        continue
      s_col, t_col, c_col = columns or (0, 1, 2)
      try:
        s, t = int(fields[s_col]), int(fields[t_col])
        c = float(fields[c_col])
      except (ValueError, IndexError):
        raise annotations.LabelError(source, lineno, "expected source_index, "
                                     "target_index and confidence, got "
                                     f"{line[:80]!r}") from None
      for name, value in (("source", s), ("target", t)):
        if not 0 <= value < num_classes:
          raise annotations.LabelError(source, lineno, f"{name} index "
                                       f"{value} out of range "
                                       f"0..{num_classes - 1}")
      if not 0.0 < c <= 1.0:
        raise annotations.LabelError(source, lineno, f"confidence {c} "
                                     "outside (0, 1]")
      sources.append(s)
      targets.append(t)
      confs.append(c)
  order = np.lexsort((targets, sources))
  return CooccurrencePairs(
      num_classes=num_classes,
      sources=np.array(sources, np.int32)[order],
      targets=np.array(targets, np.int32)[order],
      confidences=np.array(confs, np.float32)[order])
