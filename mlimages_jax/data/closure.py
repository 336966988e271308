"""Augmenting label sets: co-occurrence targets, then closure over ancestors.

Closure rule (`close_over_ancestors`): a class's closed confidence is the
maximum of its own confidence and the positive confidences of its annotated
descendants. So an ancestor gets the highest confidence among its annotated
descendants, a -1 (or 0) never propagates, and an explicit -1 on a class
stays -1 unless a descendant is annotated positive: the hierarchy then states
the class is present, which overrides "unknown".

Two layers share the rule: one row (`augment`, on Python lists: a few
microseconds a row, so it also serves the TFDS builder, which augments one
example at a time), and a CSR batch (`augment_batch`, `close_batch`:
thousands of rows at once in NumPy). The co-occurrence pairs are an input
here, so this module sits above `cooccurrence`, which never imports it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np

from mlimages_jax.data.annotations import reduce_max
from mlimages_jax.data.hierarchy import Hierarchy
from mlimages_jax.data.hierarchy import ragged_arange

if TYPE_CHECKING:
  from mlimages_jax.data.cooccurrence import CooccurrencePairs

# What a dataset did to its annotations (TFDS builder option, recorded in the
# dataset's and every checkpoint's metadata): "closed" = co-occurrence pairs
# (when given) then closure over ancestors; "as_given" = the annotations
# exactly as listed, as the original's shipped lists and TFRecords are.
LABEL_CLOSURES = ("closed", "as_given")


def close_over_ancestors(hierarchy: Hierarchy, indices: np.ndarray,
                         confidences: np.ndarray) -> tuple[np.ndarray,
                                                           np.ndarray]:
  """Adds every ancestor of the positive labels (rule in the module doc)."""
  return augment(hierarchy, indices, confidences)


def augment(hierarchy: Hierarchy, indices: np.ndarray,
            confidences: np.ndarray, pairs: CooccurrencePairs | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """The full augmentation of one image's labels: co-occurrence, closure.

  The TFDS builder calls this once per example, so it works on Python lists
  and dicts (a few microseconds) rather than on the batch path's arrays,
  whose fixed cost per call is far larger than one row's work; the tests
  check that both give the same result.
  """
  idx = np.asarray(indices, np.int32).reshape(-1)
  conf = np.asarray(confidences, np.float32).reshape(-1)
  if idx.shape != conf.shape:
    raise ValueError(f"{idx.size} indices but {conf.size} confidences")
  if idx.size and not 0 <= idx.min() <= idx.max() < hierarchy.num_classes:
    raise ValueError(f"class indices must be in 0..{hierarchy.num_classes - 1}"
                     f", got {idx.tolist()}")
  best: dict[int, float] = {}
  for i, c in zip(idx.tolist(), conf.tolist()):
    if c > best.get(i, -np.inf):
      best[i] = c
  if pairs is not None:
    for i, c in list(best.items()):
      if c > 0:
        first, last = np.searchsorted(pairs.sources, [i, i + 1])
        for target, pair_conf in zip(pairs.targets[first:last].tolist(),
                                     pairs.confidences[first:last].tolist()):
          added = min(c, pair_conf)
          if added > best.get(target, -np.inf):
            best[target] = added
  ancestors = _ancestor_lists(hierarchy)
  for i, c in list(best.items()):
    if c > 0:
      for a in ancestors[i]:
        if c > best.get(a, -np.inf):
          best[a] = c
  order = sorted(best)
  return (np.array(order, np.int32),
          np.array([best[i] for i in order], np.float32))


_ANCESTOR_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ancestor_lists(hierarchy: Hierarchy) -> list[list[int]]:
  """`hierarchy.ancestors(i)` for every i as Python lists (cached)."""
  lists = _ANCESTOR_LISTS.get(hierarchy)
  if lists is None:
    ptr = hierarchy.ancestor_indptr.tolist()
    flat = hierarchy.ancestor_indices.tolist()
    lists = [flat[a:b] for a, b in zip(ptr[:-1], ptr[1:])]
    _ANCESTOR_LISTS[hierarchy] = lists
  return lists


def close_batch(hierarchy: Hierarchy, indptr: np.ndarray, indices: np.ndarray,
                confidences: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`close_over_ancestors` for every row of a CSR batch at once.

  Rows with a single positive label (most ImageNet rows) copy that class's
  precomputed closed chain; the others go through one sort (`reduce_max`).
  """
  counts = np.diff(indptr)
  first = np.minimum(indptr[:-1], max(len(indices) - 1, 0))
  single = (counts == 1) & (confidences[first] > 0) if len(indices) else (
      np.zeros(len(counts), bool))
  if not single.any():
    return _close_sorting(hierarchy, indptr, indices, confidences)
  rows_1, rows_n = np.flatnonzero(single), np.flatnonzero(~single)
  classes_1, conf_1 = indices[indptr[rows_1]], confidences[indptr[rows_1]]
  chain_ptr, chain_idx = hierarchy.closure_csr
  len_1 = chain_ptr[classes_1 + 1] - chain_ptr[classes_1]
  entries_n = ragged_arange(indptr[rows_n], counts[rows_n])
  ptr_n, idx_n, conf_n = _close_sorting(
      hierarchy, np.concatenate([[0], np.cumsum(counts[rows_n])]),
      indices[entries_n], confidences[entries_n])
  out_counts = np.empty(len(counts), np.int64)
  out_counts[rows_1] = len_1
  out_counts[rows_n] = np.diff(ptr_n)
  out_ptr = np.zeros(len(counts) + 1, np.int64)
  np.cumsum(out_counts, out=out_ptr[1:])
  out_idx = np.empty(out_ptr[-1], np.int32)
  out_conf = np.empty(out_ptr[-1], np.float32)
  at_1 = ragged_arange(out_ptr[rows_1], len_1)
  out_idx[at_1] = chain_idx[ragged_arange(chain_ptr[classes_1], len_1)]
  out_conf[at_1] = np.repeat(conf_1, len_1)
  at_n = ragged_arange(out_ptr[rows_n], out_counts[rows_n])
  out_idx[at_n] = idx_n
  out_conf[at_n] = conf_n
  return out_ptr, out_idx, out_conf


def _close_sorting(hierarchy: Hierarchy, indptr: np.ndarray,
                   indices: np.ndarray, confidences: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  num_rows = len(indptr) - 1
  rows = np.repeat(np.arange(num_rows), np.diff(indptr))
  positive = np.flatnonzero(confidences > 0)
  sources = indices[positive]
  anc_ptr = hierarchy.ancestor_indptr
  counts = anc_ptr[sources + 1] - anc_ptr[sources]
  ancestors = hierarchy.ancestor_indices[ragged_arange(anc_ptr[sources],
                                                       counts)]
  return reduce_max(
      np.concatenate([rows, np.repeat(rows[positive], counts)]),
      np.concatenate([indices, ancestors]),
      np.concatenate([confidences, np.repeat(confidences[positive], counts)]),
      num_rows, hierarchy.num_classes)


def augment_batch(hierarchy: Hierarchy, indptr: np.ndarray,
                  indices: np.ndarray, confidences: np.ndarray, *,
                  pairs: CooccurrencePairs | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`augment` for every row of a CSR batch at once."""
  if pairs is not None:
    indptr, indices, confidences = pairs.expand_batch(indptr, indices,
                                                      confidences)
  return close_batch(hierarchy, indptr, indices, confidences)
