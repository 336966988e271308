"""Tests for mlimages_jax.data.cooccurrence: matrix, rules, TSV, expansion."""

from __future__ import annotations

import numpy as np
import pytest

from mlimages_jax.data import annotations
from mlimages_jax.data import closure
from mlimages_jax.data import cooccurrence as cooc
from mlimages_jax.data.hierarchy import Hierarchy

NUM_CLASSES = 40
COLUMNS = np.array([30, 31, 32, 33, 34, 35, 2, 1], np.int32)  # 8 score columns.


@pytest.fixture(name="tree")
def fixture_tree() -> Hierarchy:
  # 0 and 1 roots; 2..29 "ImageNet" classes under them (2 is a parent of
  # 3..9); 30..39 "Open Images" classes under root 1.
  parents = [-1, -1, 0] + [2] * 7 + [0] * 10 + [1] * 10 + [1] * 10
  return Hierarchy.from_arrays([f"n{i}" for i in range(NUM_CLASSES)],
                               [f"c{i}" for i in range(NUM_CLASSES)], parents)


def synthetic_scores(seed: int = 0, num_images: int = 3000):
  """Scores with planted pairs: images of class c show column c % 8 often."""
  rng = np.random.default_rng(seed)
  classes = rng.integers(3, 30, num_images)
  classes[rng.random(num_images) < 0.03] = -1  # Images left out.
  scores = rng.uniform(0.0, 0.3, (num_images, len(COLUMNS)))
  planted = classes >= 0
  scores[np.flatnonzero(planted), classes[planted] % 8] = rng.uniform(
      0.6, 1.0, planted.sum())
  scores[:, 5] = rng.uniform(0.5, 0.7, num_images)  # A tag on every image.
  return scores.astype(np.float32), classes


def reference_pairs(scores, classes, tree, rules):
  overall = scores[classes >= 0].astype(np.float64).mean(axis=0)
  pairs = []
  for c in sorted(set(classes.tolist()) - {-1}):
    rows = scores[classes == c].astype(np.float64)
    if len(rows) < rules.min_images:
      continue
    mean = rows.mean(axis=0)
    candidates = []
    for j, target in enumerate(COLUMNS.tolist()):
      lift = mean[j] / overall[j]
      if (mean[j] >= rules.threshold and lift >= rules.min_lift
          and target != c and target not in tree.ancestors(c).tolist()):
        candidates.append((-mean[j], j, target))
    best = {}
    for neg_mean, j, target in sorted(candidates)[:rules.top_k]:
      best.setdefault(target, (float(np.float32(round(-neg_mean, 2))),
                               len(rows)))
    pairs += [(c, t, conf) for t, (conf, _) in sorted(
        best.items(), key=lambda kv: -kv[1][0])]
  return pairs


def test_matrix_streams_and_matches_numpy(tmp_path):
  scores, classes = synthetic_scores()
  np.save(tmp_path / "scores.npy", scores)
  memmap = np.load(tmp_path / "scores.npy", mmap_mode="r")
  matrix = cooc.cooccurrence_matrix(memmap, classes, COLUMNS, chunk_rows=97)
  expected_classes = np.unique(classes[classes >= 0])
  np.testing.assert_array_equal(matrix.classes, expected_classes)
  for row, c in enumerate(expected_classes):
    np.testing.assert_allclose(matrix.mean_scores[row],
                               scores[classes == c].astype(np.float64).mean(0),
                               rtol=1e-9)
    assert matrix.counts[row] == (classes == c).sum()
  np.testing.assert_allclose(matrix.overall_mean,
                             scores[classes >= 0].astype(np.float64).mean(0),
                             rtol=1e-9)
  with pytest.raises(ValueError, match="image classes"):
    cooc.cooccurrence_matrix(scores, classes[:-1], COLUMNS)


@pytest.mark.parametrize("rules", [
    cooc.CooccurrenceRules(),
    cooc.CooccurrenceRules(threshold=0.3, min_lift=1.0, top_k=2,
                           min_images=100),
    cooc.CooccurrenceRules(threshold=0.0, min_lift=0.0, top_k=10,
                           min_images=1),
])
def test_select_pairs_follows_the_rules(tree, rules):
  scores, classes = synthetic_scores()
  matrix = cooc.cooccurrence_matrix(scores, classes, COLUMNS)
  pairs = cooc.select_pairs(matrix, tree, rules)
  got = list(zip(pairs.sources.tolist(), pairs.targets.tolist(),
                 pairs.confidences.tolist()))
  assert got == reference_pairs(scores, classes, tree, rules)
  if rules == cooc.CooccurrenceRules():
    # The planted pairs, and not the tag that fires on every image (lift).
    assert {(s, int(COLUMNS[s % 8])) for s in range(3, 30)
            if s % 8 != 5 and COLUMNS[s % 8] not in tree.ancestors(s)} <= set(
                zip(pairs.sources.tolist(), pairs.targets.tolist()))
    assert 35 not in pairs.targets


def test_save_load_and_expand(tree, tmp_path):
  scores, classes = synthetic_scores()
  rules = cooc.CooccurrenceRules()
  pairs = cooc.select_pairs(
      cooc.cooccurrence_matrix(scores, classes, COLUMNS), tree, rules)
  path = tmp_path / cooc.PAIRS_FILE_NAME
  pairs.save(path, tree, rules)
  assert not [p for p in tmp_path.iterdir() if p.name != path.name]
  loaded = cooc.load_cooccurrence_pairs(path, NUM_CLASSES)
  order = np.lexsort((pairs.targets, pairs.sources))
  np.testing.assert_array_equal(loaded.sources, pairs.sources[order])
  np.testing.assert_array_equal(loaded.targets, pairs.targets[order])
  np.testing.assert_array_equal(loaded.confidences, pairs.confidences[order])

  table = {}
  for s, t, c in zip(loaded.sources.tolist(), loaded.targets.tolist(),
                     loaded.confidences.tolist()):
    table.setdefault(s, []).append((t, c))
  rng = np.random.default_rng(2)
  for _ in range(200):
    idx = rng.integers(0, NUM_CLASSES, rng.integers(0, 4))
    conf = rng.choice(np.float32([1, 0.8, -1]), len(idx))
    expected = {}
    for i, c in zip(idx.tolist(), conf.tolist()):
      expected[i] = max(expected.get(i, -2.0), c)
    for i, c in zip(idx.tolist(), conf.tolist()):
      for t, pc in table.get(i, []) if c > 0 else []:
        expected[t] = max(expected.get(t, -2.0), min(c, pc))
    closed = closure.close_over_ancestors(tree, list(expected),
                                          list(expected.values()))
    got = closure.augment(tree, idx, conf, pairs=loaded)
    np.testing.assert_array_equal(got[0], closed[0])
    np.testing.assert_array_equal(got[1], closed[1])


def test_load_errors_name_file_and_line(tmp_path):
  path = tmp_path / "pairs.tsv"
  path.write_text("# comment\nsource_index\ttarget_index\tconfidence\n"
                  "3\t30\t0.8\n4\t99\t0.8\n")
  with pytest.raises(annotations.LabelError,
                     match=rf"^{path}:4: target index 99 out of range"):
    cooc.load_cooccurrence_pairs(path, NUM_CLASSES)
  path.write_text("3\t30\t0.8\n3\t31\n")  # Headerless: first three columns.
  with pytest.raises(annotations.LabelError, match=rf"^{path}:2: expected"):
    cooc.load_cooccurrence_pairs(path, NUM_CLASSES)
  path.write_text("3\t30\t1.5\n")
  with pytest.raises(annotations.LabelError,
                     match=rf"^{path}:1: confidence"):
    cooc.load_cooccurrence_pairs(path, NUM_CLASSES)


def test_load_accepts_bom_and_crlf_and_names_bad_bytes(tmp_path):
  """With a BOM the header read as a data line (an error at line 1)."""
  path = tmp_path / "pairs.tsv"
  path.write_bytes(b"\xef\xbb\xbfsource_index\ttarget_index\tconfidence\r\n"
                   b"3\t30\t0.8\r\n")
  pairs = cooc.load_cooccurrence_pairs(path, NUM_CLASSES)
  assert (pairs.sources.tolist(), pairs.targets.tolist()) == ([3], [30])
  path.write_bytes(b"3\t30\t0.8\n# caf\xe9\n")
  with pytest.raises(annotations.LabelError, match=rf"^{path}:2: not UTF-8"):
    cooc.load_cooccurrence_pairs(path, NUM_CLASSES)


def test_image_classes_takes_the_deepest_positive_label(tree, tmp_path):
  path = tmp_path / "images.txt"
  path.write_text("a 5\nb 0:1 2:1 4:1\nc 4:-1\nd 3:0.9 2:1\n")
  np.testing.assert_array_equal(cooc.image_classes(path, tree),
                                [5, 4, -1, 3])
