"""Benchmark: our exact mAP against scikit-learn's per-class loop, same data.

Scores and labels imitate the ML-Images validation set: sparse positives
(about 1 %, with fractional confidences), some ignored (-1) entries and
float16-rounded logits, so ties occur. Both sides compute the same per-class
APs (checked to 1e-6); the figure is the speed-up. ``--streaming`` also times
the bounded-memory accumulator (blocks spilled to disk) on generated batches of
the full validation set's size (88,739 x 11,166) without ever holding them as
one array. ``--images/--classes`` scale the comparison up (the sklearn
baseline then runs on ``--baseline-classes`` classes, extrapolated per class).

  python benchmarks/eval_bench.py
  python benchmarks/eval_bench.py --streaming
  python benchmarks/eval_bench.py --images 88739 --classes 2000 \
      --baseline-classes 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np
from sklearn.metrics import average_precision_score

from mlimages_jax.evaluation import metrics


def make_problem(images: int, classes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  scores = rng.normal(-3.0, 2.0, size=(images, classes)).astype(np.float16)
  labels = np.zeros((images, classes), np.float32)
  positive = rng.random((images, classes)) < 0.01
  labels[positive] = rng.choice([1.0, 0.8], size=positive.sum())
  labels[rng.random((images, classes)) < 0.005] = -1.0
  scores = scores.astype(np.float32) + np.float32(2) * positive  # Informative.
  return scores, labels


def sklearn_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  ap = np.full(scores.shape[1], np.nan)
  for c in range(scores.shape[1]):
    keep = labels[:, c] >= 0
    y = labels[keep, c] > 0
    if y.any():
      ap[c] = average_precision_score(y, scores[keep, c])
  return ap


def stream(images: int, classes: int, batch: int = 1024) -> None:
  """Times the bounded-memory accumulator on generated batches (disk spill).

  The batches are made on the fly, so no dense [images, classes] array ever
  exists; the peak resident memory shows what the evaluation costs.
  """
  with tempfile.TemporaryDirectory() as spill:
    acc = metrics.MultiLabelAccumulator(classes, spill_dir=spill)
    update_s = 0.0
    for i in range(0, images, batch):
      scores, labels = make_problem(min(batch, images - i), classes, seed=i)
      start = time.perf_counter()
      acc.update(scores, labels)
      update_s += time.perf_counter() - start
    start = time.perf_counter()
    result = acc.result()
    result_s = time.perf_counter() - start
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"streaming {images} x {classes} (spilled to disk): updates "
        f"(top-k counts, spill) {update_s:.1f} s, AP of all classes + "
        f"summary {result_s:.1f} s, mAP {result['map']:.6f}, peak RSS "
        f"{peak_gb:.2f} GB (dense float32 scores would be "
        f"{images * classes * 4 / 2**30:.2f} GB)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=20000)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--baseline-classes", type=int, default=1000,
                      help="classes the sklearn baseline runs on")
  parser.add_argument("--repeats", type=int, default=5,
                      help="best-of-N timing for both sides (shared CPUs)")
  parser.add_argument("--streaming", action="store_true",
                      help="also time MultiLabelAccumulator on generated "
                      "batches, spilled to disk")
  parser.add_argument("--stream-images", type=int, default=88739)
  parser.add_argument("--stream-classes", type=int, default=11166)
  args = parser.parse_args()

  scores, labels = make_problem(args.images, args.classes)
  base = min(args.baseline_classes, args.classes)

  sklearn_s, ours_s, one_thread_s = (float("inf"),) * 3
  for _ in range(args.repeats):  # Interleaved, so all see the same load.
    start = time.perf_counter()
    ref = sklearn_ap(scores[:, :base], labels[:, :base])
    sklearn_s = min(sklearn_s,
                    (time.perf_counter() - start) * args.classes / base)
    start = time.perf_counter()
    ours = metrics.average_precision(scores, labels)
    ours_s = min(ours_s, time.perf_counter() - start)
    start = time.perf_counter()
    metrics.average_precision(scores, labels, num_threads=1)
    one_thread_s = min(one_thread_s, time.perf_counter() - start)

  max_diff = float(np.nanmax(np.abs(ours[:base] - ref)))
  if not (np.array_equal(np.isnan(ours[:base]), np.isnan(ref))
          and max_diff <= 1e-6):
    raise SystemExit(f"mismatch with scikit-learn: max |diff| {max_diff}")
  print(f"{args.images} images x {args.classes} classes: "
        f"mAP {np.nanmean(ours):.6f}, max |ours - sklearn| {max_diff:.2e}")
  print(f"scikit-learn per-class loop: {sklearn_s:8.2f} s"
        + (f" (extrapolated from {base} classes)" if base < args.classes else ""))
  print(f"mlimages_jax.evaluation.metrics:        {ours_s:8.2f} s "
        f"(best of {args.repeats}, {os.cpu_count()} CPU threads; "
        f"{one_thread_s:.2f} s on 1 thread, "
        f"{sklearn_s / one_thread_s:.1f}x)")

  if args.streaming:
    stream(args.stream_images, args.stream_classes)

  print(json.dumps({
      "benchmark": "eval_map_vs_sklearn",
      "value": round(ours_s, 3), "unit": "s",
      "baseline": round(sklearn_s, 3),
      "ratio": round(sklearn_s / ours_s, 1),
      "target": 20,
  }))


if __name__ == "__main__":
  main()
