"""Benchmark: memory and time of one evaluation of the full validation split.

Both `mlimages evaluate` and the training loop evaluate through
`evaluation.evaluator.evaluate_model`. On every host it gathers each global
batch's logits (all processes' shards) and streams them into
`metrics.MultiLabelAccumulator`, which spills them to the local disk, saves
its progress every 50 batches and ranks class chunks at the end. This
benchmark runs that host side on generated logits of the real size
(88,739 images x 11,166 classes, in global batches of the recipe's 2,048)
and reports the peak resident memory of the process (= one host) and the
time. The network's forward pass is not included (it is the same work as
any evaluation).

The baseline, measured in the same run (a second process), is the deleted
in-loop evaluator: every host gathered all scores and labels as dense arrays
and ranked them at once, which is why it looked at 10,000 images only; it
runs at `--baseline-images` (10,000 by default: more does not fit next to
other jobs) and its memory is extrapolated linearly to the full split.

  python benchmarks/eval_memory_bench.py
  python benchmarks/eval_memory_bench.py --images 20000  # A quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from eval_bench import make_problem  # benchmarks/ is the script's folder.
from mlimages_jax.evaluation import metrics

SAVE_EVERY = 50  # evaluate_model's default progress interval (batches):
# at batch 2,048 the split is 44 batches, so a full run saves none.


def _peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def streaming(images: int, classes: int, batch: int) -> dict:
  """The evaluator's host side: update, periodic state save, result."""
  generate_s = update_s = save_s = 0.0
  cpu_s = 0.0  # CPU seconds of all threads, generation excluded.
  with tempfile.TemporaryDirectory() as progress:
    accumulator = metrics.MultiLabelAccumulator(
        classes, top_k=(1, 5, 10), spill_dir=f"{progress}/scores")
    for done, start in enumerate(range(0, images, batch), 1):
      t0 = time.perf_counter()
      scores, labels = make_problem(min(batch, images - start), classes,
                                    seed=start)
      t1, c1 = time.perf_counter(), time.process_time()
      accumulator.update(scores, labels)
      t2 = time.perf_counter()
      if done % SAVE_EVERY == 0:
        np.savez(f"{progress}/state.npz", **accumulator.state())
      generate_s += t1 - t0
      update_s += t2 - t1
      save_s += time.perf_counter() - t2
      cpu_s += time.process_time() - c1
    t0, c0 = time.perf_counter(), time.process_time()
    result = accumulator.result()
    result_s = time.perf_counter() - t0
    cpu_s += time.process_time() - c0
  return {"images": images, "map": result["map"], "generate_s": generate_s,
          "update_s": update_s, "save_s": save_s, "result_s": result_s,
          "seconds": update_s + save_s + result_s, "cpu_s": cpu_s,
          "peak_gb": _peak_gb()}


def dense(images: int, classes: int, batch: int) -> dict:
  """The deleted in-loop path: all batches kept, concatenated, ranked."""
  start_gb = _peak_gb()  # The process before any score: imports only.
  all_scores, all_labels = [], []
  generate_s = 0.0
  t_start = time.perf_counter()
  for start in range(0, images, batch):
    t0 = time.perf_counter()
    scores, labels = make_problem(min(batch, images - start), classes,
                                  seed=start)
    generate_s += time.perf_counter() - t0
    all_scores.append(scores)
    all_labels.append(labels)
  scores, labels = np.concatenate(all_scores), np.concatenate(all_labels)
  del all_scores, all_labels
  value = metrics.mean_average_precision(scores, labels)
  seconds = time.perf_counter() - t_start - generate_s
  return {"images": images, "map": value, "seconds": seconds,
          "peak_gb": _peak_gb(), "start_gb": start_gb}


def _in_subprocess(mode: str, images: int, args: argparse.Namespace) -> dict:
  """Each side in its own process, so that each peak RSS is its own."""
  out = subprocess.run(
      [sys.executable, __file__, "--mode", mode, "--images", str(images),
       "--classes", str(args.classes), "--batch", str(args.batch)],
      check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=88_739)
  parser.add_argument("--classes", type=int, default=11_166)
  parser.add_argument("--batch", type=int, default=2048,
                      help="global evaluation batch (the recipe's)")
  parser.add_argument("--baseline-images", type=int, default=10_000)
  parser.add_argument("--mode", choices=("streaming", "dense"),
                      help=argparse.SUPPRESS)  # One side, in a subprocess.
  args = parser.parse_args()
  if args.mode:
    side = streaming if args.mode == "streaming" else dense
    print(json.dumps(side(args.images, args.classes, args.batch)))
    return

  ours = _in_subprocess("streaming", args.images, args)
  base = _in_subprocess("dense", args.baseline_images, args)
  scale = args.images / args.baseline_images
  # The imports do not grow with the split; the arrays grow linearly.
  base_full_gb = base["start_gb"] + (base["peak_gb"] - base["start_gb"]) * scale
  dense_gb = args.images * args.classes * 4 / 2**30
  print(f"streaming evaluator, {args.images} x {args.classes} in batches of "
        f"{args.batch}: peak RSS {ours['peak_gb']:.2f} GB per host; "
        f"{ours['seconds']:.1f} s (updates {ours['update_s']:.1f} s, "
        f"progress saves {ours['save_s']:.1f} s, AP of every class + summary "
        f"{ours['result_s']:.1f} s; {ours['cpu_s']:.1f} CPU-s on "
        f"{os.cpu_count()} cores; generating the logits took "
        f"{ours['generate_s']:.1f} s more); mAP {ours['map']:.6f}; "
        f"{dense_gb:.2f} GB of scores spilled to the local disk")
  print(f"deleted in-loop evaluator (dense gather), {args.baseline_images} "
        f"images: peak RSS {base['peak_gb']:.2f} GB, {base['seconds']:.1f} s; "
        f"{base['start_gb']:.2f} GB of it before any score; x{scale:.2f} "
        f"for the full split: about {base_full_gb:.1f} GB per host")
  print(json.dumps({
      "benchmark": "eval_memory_full_split",
      "value": round(ours["peak_gb"], 2), "unit": "GB peak RSS per host",
      "baseline": round(base_full_gb, 2),
      "ratio": round(base_full_gb / ours["peak_gb"], 1),
      "target": round(dense_gb, 2),  # Under the dense scores alone.
  }))


if __name__ == "__main__":
  main()
