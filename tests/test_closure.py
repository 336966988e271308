"""Tests for mlimages_jax.data.closure: one row and CSR batches."""

from __future__ import annotations

import numpy as np
import pytest

from mlimages_jax.data import closure
from mlimages_jax.data import cooccurrence
from mlimages_jax.data.hierarchy import Hierarchy

from label_helpers import PARENTS
from label_helpers import as_dict
from label_helpers import random_forest_tree
from label_helpers import random_rows
from label_helpers import reference_close
from label_helpers import write_random_pairs


@pytest.fixture(name="tree")
def fixture_tree() -> Hierarchy:
  return Hierarchy.from_arrays([f"n{i}" for i in range(7)],
                               [f"c{i}" for i in range(7)], PARENTS)


def test_closure_rule(tree: Hierarchy):
  close = lambda i, c: as_dict(*closure.close_over_ancestors(tree, i, c))
  # Ancestors get the highest confidence among annotated descendants.
  assert close([1, 3], [0.8, 0.9]) == pytest.approx(
      {0: 0.9, 1: 0.8, 2: 0.8, 3: 0.9, 5: 0.9})
  # -1 and 0 never propagate; an explicit -1 without positive descendant stays.
  assert close([1, 6], [-1, 0]) == {1: -1.0, 6: 0.0}
  assert close([0, 3], [-1, 0.7]) == pytest.approx({0: 0.7, 3: 0.7, 5: 0.7})
  # An explicit ancestor confidence above its descendants' is kept.
  assert close([2, 5], [0.8, 1.0]) == pytest.approx({0: 0.8, 2: 0.8, 5: 1.0})
  assert close([], []) == {}


def test_closure_matches_reference_and_is_idempotent():
  tree = random_forest_tree(3, 400)
  rng = np.random.default_rng(4)
  rows = random_rows(rng, 2000, 400)
  indptr = np.concatenate([[0], np.cumsum([len(i) for _, i, _ in rows])])
  idx = np.concatenate([i for _, i, _ in rows]).astype(np.int32)
  conf = np.concatenate([c for _, _, c in rows]).astype(np.float32)
  c_ptr, c_idx, c_conf = closure.close_batch(tree, indptr, idx, conf)
  parents = tree.parents.tolist()
  for r, (_, i, c) in enumerate(rows):
    got = as_dict(c_idx[c_ptr[r]:c_ptr[r + 1]], c_conf[c_ptr[r]:c_ptr[r + 1]])
    assert got == reference_close(parents, i.tolist(), c.tolist())
    single = closure.close_over_ancestors(tree, i, c)
    assert as_dict(*single) == got
  again = closure.close_batch(tree, c_ptr, c_idx, c_conf)
  for a, b in zip(again, (c_ptr, c_idx, c_conf)):
    np.testing.assert_array_equal(a, b)


def test_augment_one_row_matches_batch_path(tmp_path):
  tree = random_forest_tree(5, 300)
  rng = np.random.default_rng(6)
  pairs_path = write_random_pairs(tmp_path, rng, 300, 200, [0.5, 0.7, 0.9])
  pairs = cooccurrence.load_cooccurrence_pairs(pairs_path, 300)
  rows = random_rows(rng, 1000, 300)
  indptr = np.concatenate([[0], np.cumsum([len(i) for _, i, _ in rows])])
  idx = np.concatenate([i for _, i, _ in rows]).astype(np.int32)
  conf = np.concatenate([c for _, _, c in rows]).astype(np.float32)
  for with_pairs in (None, pairs):
    b_ptr, b_idx, b_conf = closure.augment_batch(tree, indptr, idx, conf,
                                                 pairs=with_pairs)
    for r, (_, i, c) in enumerate(rows):
      one_idx, one_conf = closure.augment(tree, i, c, with_pairs)
      assert one_idx.dtype == np.int32 and one_conf.dtype == np.float32
      np.testing.assert_array_equal(one_idx, b_idx[b_ptr[r]:b_ptr[r + 1]])
      np.testing.assert_array_equal(one_conf, b_conf[b_ptr[r]:b_ptr[r + 1]])
  with pytest.raises(ValueError, match="class indices must be in 0..299"):
    closure.augment(tree, [300], [1.0])
  with pytest.raises(ValueError, match="2 indices but 1 confidences"):
    closure.augment(tree, [1, 2], [1.0])
