"""Tests for mlimages_jax.evaluation.metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlimages_jax.evaluation import metrics


def _sklearn_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-class AP with scikit-learn, ignored (< 0) entries removed."""
  ap = np.full(scores.shape[1], np.nan)
  for c in range(scores.shape[1]):
    keep = labels[:, c] >= 0
    y = labels[keep, c] > 0
    if y.any():
      ap[c] = average_precision_score(y, scores[keep, c])
  return ap


def _random_problem(seed: int, n: int = 300, c: int = 40, ties: bool = True):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(n, c)).astype(np.float32)
  if ties:  # Few distinct values: many ties inside each class.
    scores = np.round(scores * 2) / 2
  labels = (rng.random((n, c)) < 0.1).astype(np.float32)
  labels[rng.random((n, c)) < 0.05] = -1
  labels[rng.random((n, c)) < 0.02] = 0.6  # Fractional confidence: positive.
  labels[:, 3] = np.where(labels[:, 3] > 0, 0, labels[:, 3])  # No positive.
  labels[:, 5] = 0  # No positive, no ignored entry.
  return scores, labels


@pytest.mark.parametrize(
    "scores, labels, expected",
    [
        ([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], (1 + 2 / 3) / 2),
        # Ties: 0.5 is one threshold (TP 1, all 3); then 0.1 (TP 2 of 4).
        ([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1], 0.5 * 1 / 3 + 0.5 * 2 / 4),
        # The ignored entry ranks first but is removed.
        ([0.9, 0.8, 0.7], [-1, 1, 0], 1.0),
        ([0.3, 0.3, 0.3], [1, 0, 0], 1 / 3),
        ([0.1, 0.2], [0, 0], np.nan),
        ([0.1, 0.2], [-1, -1], np.nan),
    ])
def test_average_precision_hand_computed(scores, labels, expected):
  ap = metrics.average_precision(np.array(scores)[:, None],
                                 np.array(labels)[:, None])
  np.testing.assert_allclose(ap, [expected], rtol=1e-12)


@pytest.mark.parametrize("seed, ties", [(0, True), (1, False), (2, True)])
def test_average_precision_matches_sklearn(seed, ties):
  scores, labels = _random_problem(seed, ties=ties)
  ours = metrics.average_precision(scores, labels)
  ref = _sklearn_ap(scores, labels)
  np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
  assert np.isnan(ours[[3, 5]]).all()
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
  assert metrics.mean_average_precision(scores, labels) == pytest.approx(
      np.nanmean(ref), abs=1e-12)


def test_average_precision_float64_and_class_chunks(monkeypatch):
  scores, labels = _random_problem(3, n=50, c=30, ties=False)
  scores = scores.astype(np.float64) + 1e-12  # Distinct only in float64.
  ref = _sklearn_ap(scores, labels)
  monkeypatch.setattr(metrics, "_CHUNK_BYTES", 4 * 50 * 7)  # 7 classes/chunk.
  ap = metrics.average_precision(scores, labels, num_threads=3)
  np.testing.assert_allclose(ap, ref, atol=1e-12)
  np.testing.assert_array_equal(
      metrics.average_precision(scores, labels, num_threads=1), ap)


def test_mean_average_precision_rejects_bad_input():
  with pytest.raises(ValueError, match="NaN"):
    metrics.mean_average_precision(np.array([[np.nan]]), np.array([[1]]))
  with pytest.raises(ValueError, match="num_examples, num_classes"):
    metrics.mean_average_precision(np.zeros((2, 3)), np.zeros((3, 2)))
  assert np.isnan(metrics.mean_average_precision(np.zeros((2, 2)),
                                                 np.zeros((2, 2))))


def test_map_by_depth():
  ap = np.array([0.5, np.nan, 1.0, 0.25, 0.75])
  depth = np.array([0, 1, 1, 2, 2])
  assert metrics.map_by_depth(ap, depth) == {
      0: {"map": 0.5, "num_classes": 1},
      1: {"map": 1.0, "num_classes": 1},
      2: {"map": 0.5, "num_classes": 2},
  }


def _top_k_reference(scores, labels, k):
  """Loop-by-loop top-k P/R/F1 (distinct scores, ignored entries removed)."""
  n, c = scores.shape
  tp, pred, pos = np.zeros(c), np.zeros(c), (labels > 0).sum(0)
  image = []
  for i in range(n):
    valid = [j for j in range(c) if labels[i, j] >= 0]
    top = sorted(valid, key=lambda j: -scores[i, j])[:k]
    hits = sum(labels[i, j] > 0 for j in top)
    for j in top:
      pred[j] += 1
      tp[j] += labels[i, j] > 0
    npos = (labels[i] > 0).sum()
    if npos:
      p, r = hits / k, hits / npos
      image.append((p, r, 2 * p * r / (p + r) if p + r else 0.0))
  has = pos > 0
  cp = np.where(pred > 0, tp / np.maximum(pred, 1), 0)[has].mean()
  cr = (tp[has] / pos[has]).mean()
  op, orr = tp.sum() / pred.sum(), tp.sum() / pos.sum()
  return {"per_class": {"precision": cp, "recall": cr,
                        "f1": 2 * cp * cr / (cp + cr)},
          "overall": {"precision": op, "recall": orr,
                      "f1": 2 * op * orr / (op + orr)},
          "per_image": dict(zip(("precision", "recall", "f1"),
                                np.mean(image, axis=0)))}, tp, pred


@pytest.mark.parametrize("spill", [False, True])
def test_streaming_equals_in_memory(tmp_path, spill, monkeypatch):
  scores, labels = _random_problem(4, n=203, c=37, ties=False)
  monkeypatch.setattr(metrics, "_CHUNK_BYTES", 4 * 203 * 8)  # 8 classes/chunk.
  acc = metrics.MultiLabelAccumulator(
      37, top_k=(1, 3), spill_dir=tmp_path / "spill" if spill else None,
      block_rows=16)
  start = 0
  for size in (1, 50, 7, 100, 45):  # Batches straddle block boundaries.
    batch = slice(start, start + size)
    # Padding rows (mask 0) with garbage must be dropped.
    pad_scores = np.full((3, 37), 99.0, np.float32)
    pad_labels = np.ones((3, 37), np.float32)
    acc.update(np.concatenate([scores[batch], pad_scores]),
               np.concatenate([labels[batch], pad_labels]),
               mask=np.r_[np.ones(size), np.zeros(3)])
    start += size
  assert start == 203 and acc.num_examples == 203
  if spill:
    assert len(list((tmp_path / "spill").glob("scores_*.f32"))) == 12
  depth = np.arange(37) % 3
  result = acc.result(depth=depth)
  ap = metrics.average_precision(scores, labels)
  np.testing.assert_array_equal(acc.average_precision(), ap)
  assert result["map"] == metrics.mean_average_precision(scores, labels)
  assert result["map_by_depth"] == {
      str(d): v for d, v in metrics.map_by_depth(ap, depth).items()}
  assert result["num_classes_with_positives"] == 35
  for k in (1, 3):
    ref, tp, pred = _top_k_reference(scores, labels, k)
    for group in ("per_class", "overall", "per_image"):
      for name in ("precision", "recall", "f1"):
        assert result[f"top{k}"][group][name] == pytest.approx(
            ref[group][name], abs=1e-12), (k, group, name)
    counts = acc.top_k_per_class(k)
    np.testing.assert_array_equal(counts["true_positives"], tp)
    np.testing.assert_array_equal(counts["predicted"], pred)
    assert result["per_class"][f"precision@{k}"] == counts["precision"].tolist()


def test_top_k_correct_and_single_label_accumulator():
  scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.2, 0.1], [0.2, 0.2, 0.6]])
  labels = np.array([2, 2, 0])
  np.testing.assert_array_equal(metrics.top_k_correct(scores, labels, 1),
                                [False, False, False])
  np.testing.assert_array_equal(metrics.top_k_correct(scores, labels, 2),
                                [True, False, True])  # Tie with class 1.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(100, 20))
  targets = rng.integers(0, 20, size=100)
  acc = metrics.SingleLabelAccumulator(top_k=(1, 5))
  acc.update(logits[:60], targets[:60])
  acc.update(np.concatenate([logits[60:], logits[:5]]),
             np.concatenate([targets[60:], targets[:5]]),
             mask=np.r_[np.ones(40), np.zeros(5)])
  order = np.argsort(-logits, axis=1)
  assert acc.result() == {
      "num_examples": 100,
      "top1": np.mean(order[:, 0] == targets),
      "top5": np.mean((order[:, :5] == targets[:, None]).any(1)),
  }


def test_accumulator_state_resumes_exactly(tmp_path):
  """A run restored from state() after a "kill" ends like an uninterrupted one."""
  scores, labels = _random_problem(5, n=120, c=20, ties=True)
  full = metrics.MultiLabelAccumulator(20, top_k=(1, 4),
                                       spill_dir=tmp_path / "a", block_rows=16)
  for i in range(0, 120, 30):
    full.update(scores[i:i + 30], labels[i:i + 30])
  first = metrics.MultiLabelAccumulator(20, top_k=(1, 4),
                                        spill_dir=tmp_path / "b", block_rows=16)
  for i in (0, 30):
    first.update(scores[i:i + 30], labels[i:i + 30])
  state = {k: np.array(v) for k, v in first.state().items()}
  first.update(scores[60:90], labels[60:90])  # Lost work: its block is redone.
  resumed = metrics.MultiLabelAccumulator(
      20, top_k=(1, 4), spill_dir=tmp_path / "b", block_rows=16)
  resumed.load_state(state)
  for i in (60, 90):
    resumed.update(scores[i:i + 30], labels[i:i + 30])
  # Block boundaries differ (the state flushed a partial block): same values.
  assert json.dumps(resumed.result()) == json.dumps(full.result())
  with pytest.raises(ValueError, match="other classes or top-k"):
    metrics.MultiLabelAccumulator(20, spill_dir=tmp_path / "b").load_state(
        state)
  (tmp_path / "b" / "scores_000000.f32").write_bytes(b"")
  with pytest.raises(ValueError, match="missing or truncated"):
    metrics.MultiLabelAccumulator(20, top_k=(1, 4),
                                  spill_dir=tmp_path / "b").load_state(state)
  with pytest.raises(ValueError, match="spill_dir"):
    metrics.MultiLabelAccumulator(20).state()

  single = metrics.SingleLabelAccumulator()
  single.update(scores[:50], np.arange(50) % 20)
  again = metrics.SingleLabelAccumulator()
  again.load_state(single.state())
  again.update(scores[50:], np.arange(50, 120) % 20)
  single.update(scores[50:], np.arange(50, 120) % 20)
  assert again.result() == single.result()
