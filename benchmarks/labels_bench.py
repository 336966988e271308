"""Benchmark: `labels.augment_file` against plainly reading and splitting lines.

Generates annotation lists shaped like the un-augmented ML-Images lists from
the real hierarchy (or, when the original files are absent, a generated
11,166-class forest): 60% ImageNet-style rows with one leaf class at
confidence 1 (10.7M of the 17.6M real images are such rows), 40% Open
Images-style URL rows whose tags are the label sets of the shipped
`train_urls_tiny.txt` rows reduced to their most specific labels (the form
before augmentation), or 1-3 random leaves without that file, with the odd
-1. It then times, in the same run and on the same file:

- baseline: ``for line in open(f): line.split()`` (plain Python, no output);
- augment: parse, close over the hierarchy, format and write the whole file.

ratio = augment seconds / baseline seconds (target <= 3). Peak memory is the
max RSS of a fresh subprocess running only the augment, for two file lengths,
to show it does not grow with the file.

Why the 3x target is not met here (about 8x, CPU time): the baseline only
splits lines in C, while augment must also parse numbers and write about
twice the input (the closure adds ~8 labels per row: 110 MB out of 56 MB
in). In NumPy, variable-length text is produced by gathers with one index per
output byte (~3-4 ns a byte) and parsed by whole-array passes; per stage,
for 1M rows: parse ~0.5 s, closure ~0.3 s, format ~0.6 s CPU. Closing the
gap needs a compiled kernel (numba, Cython, Rust), which this stack does not
include. The vectorised path is still ~75x faster than the per-line one.

  python benchmarks/labels_bench.py             # 1M rows (~1-2 min here)
  python benchmarks/labels_bench.py --rows 10000000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

from mlimages_jax import labels
from mlimages_jax.hierarchy import Hierarchy

DEFAULT_SHARED = pathlib.Path(os.environ.get(
    "MLIMAGES_SHARED_DIR",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "ml-images"))


def load_hierarchy(path: str | None) -> tuple[Hierarchy, str]:
  path = pathlib.Path(path or DEFAULT_SHARED /
                      "dictionary_and_semantic_hierarchy.txt")
  if path.is_file():
    return Hierarchy.from_file(path), str(path)
  rng = np.random.default_rng(0)  # A deep random forest of the real size.
  n = 11166
  parents = np.full(n, -1)
  for k in range(4, n):
    parents[k] = rng.integers(max(0, k - 2000), k)
  return (Hierarchy.from_arrays([f"n{i:08d}" for i in range(n)],
                                [f"class {i}" for i in range(n)], parents),
          "generated forest (original files not found)")


def raw_label_sets(tree: Hierarchy) -> list[list[tuple[int, str]]]:
  """Real multi-label sets without the labels their closure would add."""
  path = DEFAULT_SHARED / "train_urls_tiny.txt"
  if tree.num_classes != 11166 or not path.is_file():
    return []
  sets = []
  for _, idx, conf in labels.read_annotation_file(path, num_classes=11166):
    implied = set(np.concatenate([tree.ancestors(i) for i in idx]).tolist())
    sets.append([(i, labels.format_confidence(c)) for i, c in
                 zip(idx.tolist(), conf.tolist()) if i not in implied])
  return sets


def write_rows(path: pathlib.Path, tree: Hierarchy, num_rows: int,
               seed: int) -> None:
  rng = random.Random(seed)
  leaves = tree.leaves().tolist()
  real_sets = raw_label_sets(tree)
  confs = ["1", "0.9", "0.8"]
  with open(path, "w") as f:
    lines = []
    for r in range(num_rows):
      if rng.random() < 0.6:
        c = rng.choice(leaves)
        wnid = tree.wnids[c]
        lines.append(f"{wnid}/{wnid}_{rng.randrange(100000)}.JPEG\t{c}:1\n")
      else:
        tag_set = (rng.choice(real_sets) if real_sets else
                   [(rng.choice(leaves), rng.choice(confs))
                    for _ in range(rng.randint(1, 3))])
        tags = "\t".join(f"{i}:{'-1' if rng.random() < 0.01 else c}"
                          for i, c in tag_set)
        lines.append(f"https://c{rng.randint(1, 8)}.staticflickr.com/"
                     f"{rng.randint(1, 9)}/{rng.randrange(10**4)}/"
                     f"{rng.randrange(10**10)}_{rng.randrange(16**10):010x}"
                     f"_o.jpg\t{tags}\n")
      if len(lines) == 65536:
        f.writelines(lines)
        lines = []
    f.writelines(lines)


def baseline(path: pathlib.Path) -> tuple[float, float]:
  """(wall, CPU) seconds to read and split every line."""
  wall, cpu = time.perf_counter(), time.process_time()
  with open(path) as f:
    for line in f:
      line.split()
  return time.perf_counter() - wall, time.process_time() - cpu


def augment(tree: Hierarchy, path: pathlib.Path, out: pathlib.Path
            ) -> tuple[float, float]:
  """(wall, CPU) seconds of the whole augment, output written."""
  wall, cpu = time.perf_counter(), time.process_time()
  labels.augment_file(tree, path, out)
  return time.perf_counter() - wall, time.process_time() - cpu


def per_line(tree: Hierarchy, path: pathlib.Path, num_rows: int) -> float:
  """CPU seconds per row of the per-line path (parse, augment, format)."""
  cpu = time.process_time()
  with open(path) as f:
    for _, line in zip(range(num_rows), f):
      key, idx, conf = labels.parse_line(line, num_classes=tree.num_classes)
      labels.format_line(key, *labels.augment(tree, idx, conf))
  return (time.process_time() - cpu) / num_rows


def peak_rss_mb(tree: Hierarchy, path: pathlib.Path, out: pathlib.Path
                ) -> float:
  """Max RSS of a fresh process that loads the hierarchy and augments."""
  hierarchy_file = out.with_suffix(".hierarchy.txt")
  tree.write(hierarchy_file)
  code = (
      "import resource, sys\n"
      "from mlimages_jax import labels\n"
      "from mlimages_jax.hierarchy import Hierarchy\n"
      "tree = Hierarchy.from_file(sys.argv[1])\n"
      "labels.augment_file(tree, sys.argv[2], sys.argv[3])\n"
      "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
  done = subprocess.run([sys.executable, "-c", code, str(hierarchy_file),
                         str(path), str(out)], capture_output=True, text=True,
                        check=True)
  return int(done.stdout.strip()) / 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--repeats", type=int, default=3,
                      help="timings are the best of this many runs")
  parser.add_argument("--dictionary", default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None,
                      help="where to write the generated lists (default: tmp)")
  args = parser.parse_args()

  tree, source = load_hierarchy(args.dictionary)
  print(f"hierarchy: {source} ({tree.num_classes} classes)")
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    tmp = pathlib.Path(tmp)
    big, small = tmp / "big.txt", tmp / "small.txt"
    start = time.perf_counter()
    write_rows(big, tree, args.rows, args.seed)
    write_rows(small, tree, args.rows // 4, args.seed + 1)
    print(f"generated {args.rows} + {args.rows // 4} rows in "
          f"{time.perf_counter() - start:.1f} s ({big.stat().st_size / 1e6:.0f}"
          " MB)")
    base_times, aug_times = [], []
    for _ in range(args.repeats):  # Interleaved: both see the same load.
      base_times.append(baseline(big))
      aug_times.append(augment(tree, big, tmp / "out.txt"))
    # CPU seconds decide the ratio: this machine is shared, and wall-clock
    # time also counts other processes' load.
    (base_wall, base_s), (aug_wall, aug_s) = min(base_times, key=lambda t: t[1]
                                                 ), min(aug_times,
                                                        key=lambda t: t[1])
    out_mb = (tmp / "out.txt").stat().st_size / 1e6
    line_s = per_line(tree, big, min(args.rows, 50_000))
    rss_small = peak_rss_mb(tree, small, tmp / "out_small.txt")
    rss_big = peak_rss_mb(tree, big, tmp / "out_big.txt")

  ratio = aug_s / base_s
  print(f"baseline (read + split lines): {base_s:.3f} s CPU, {base_wall:.3f} s "
        f"wall ({args.rows / base_s:,.0f} rows/s)")
  print(f"augment (parse, close, format, write {out_mb:.0f} MB): {aug_s:.3f} s"
        f" CPU, {aug_wall:.3f} s wall ({args.rows / aug_s:,.0f} rows/s) = "
        f"{ratio:.2f}x baseline (target <= 3x)")
  print(f"for reference, the per-line path (parse_line, augment, format_line):"
        f" {1 / line_s:,.0f} rows/s")
  print(f"peak RSS of an augment process: {rss_small:.0f} MB for "
        f"{args.rows // 4} rows, {rss_big:.0f} MB for {args.rows} rows")
  print(json.dumps({
      "benchmark": "labels_augment", "value": round(args.rows / aug_s),
      "unit": "rows/s", "baseline": round(args.rows / base_s),
      "ratio": round(ratio, 3), "target": 3.0,
      "peak_rss_mb": {str(args.rows // 4): round(rss_small, 1),
                      str(args.rows): round(rss_big, 1)}}))


if __name__ == "__main__":
  main()
