"""Helpers shared by the tests of the label modules (annotations, reader,
closure, augment, openimages): reference rules, random rows and files."""

from __future__ import annotations

import pathlib

import numpy as np

from mlimages_jax.data.hierarchy import Hierarchy

# 5 "thing" -> 0 "animal" -> {2 "dog", 3 "cat"}; 2 -> 1 "puppy"; 4 -> 6.
PARENTS = [5, 2, 0, 0, -1, -1, 4]


def reference_close(parents, indices, confidences) -> dict[int, float]:
  """The closure rule, one label at a time."""
  best: dict[int, float] = {}
  for i, c in zip(indices, confidences):
    best[i] = max(best.get(i, -np.inf), c)
  for i, c in zip(indices, confidences):
    j = parents[i]
    while c > 0 and j >= 0:
      best[j] = max(best.get(j, -np.inf), c)
      j = parents[j]
  return dict(sorted(best.items()))


def as_dict(indices, confidences) -> dict[int, float]:
  assert list(indices) == sorted(set(indices))  # Sorted and unique.
  return {int(i): float(c) for i, c in zip(indices, confidences)}


def random_forest_tree(seed: int, n: int) -> Hierarchy:
  rng = np.random.default_rng(seed)
  parents = np.full(n, -1)
  perm = rng.permutation(n)
  for k in range(1, n):
    if rng.random() > 0.05:
      parents[perm[k]] = perm[rng.integers(0, k)]
  return Hierarchy.from_arrays([f"n{i}" for i in range(n)],
                               [f"c{i}" for i in range(n)], parents)


def random_rows(rng: np.random.Generator, num_rows: int, num_classes: int):
  rows = []
  for r in range(num_rows):
    k = int(rng.integers(0, 6))
    idx = rng.integers(0, num_classes, k)
    conf = rng.choice(np.float32([1, 0.9, 0.8, 0.55, -1, 0]), k)
    rows.append((f"img_{r}.jpg", idx, conf))
  return rows


def write_lines(path: pathlib.Path, lines: list[str], newline="\n") -> None:
  path.write_bytes(newline.join(lines).encode() + newline.encode())


TRICKY_LINES = [
    "n01440764/n01440764_10026.JPEG\t1:1\t0:1\t5:1",
    "http://x.org/a_o.jpg 2:0.9 2:0.8 3",  # spaces, repeat, bare index
    "",  # blank lines are ignored
    "k3\t6:.5\t4:1.0\t1:0.85\t1:-1",
    "k4\t3:1e-1\t6:+0.5\t0:-0",  # forms only float() knows: the slow path
    "k5",  # no labels
    "   k6  \t 0:0.123456789 ",
    "k7\t" + "\t".join(f"{i % 7}:0.{i % 9 + 1}" for i in range(300)),  # long
    "ключ/фото.jpg\t2:1",  # a non-ASCII key
]


def write_random_pairs(tmp_path, rng: np.random.Generator, num_classes: int,
                        num_pairs: int, confidences: list[float]):
  """A co-occurrence pairs file of random (source, target, confidence)."""
  path = tmp_path / "pairs.tsv"
  path.write_text("source_index\ttarget_index\tconfidence\n" + "".join(
      f"{s}\t{t}\t{c}\n" for s, t, c in zip(
          rng.integers(0, num_classes, num_pairs),
          rng.integers(0, num_classes, num_pairs),
          rng.choice(confidences, num_pairs))))
  return path
