"""Tests for mlimages_jax.data.stats: streamed counts, summary, the two figures."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from mlimages_jax.data import annotations
from mlimages_jax.data import stats
from mlimages_jax.data.hierarchy import Hierarchy


def write_lists(tmp_path: pathlib.Path, num_classes: int):
  """Two lists; class c gets about 3 * (c + 1) images, so some are trainable."""
  rng = np.random.default_rng(0)
  paths, rows = [], []
  for part in range(2):
    lines = []
    for n in range(2500):
      k = int(rng.poisson(4))
      idx = rng.choice(num_classes, k, p=np.arange(1, num_classes + 1)
                       / np.arange(1, num_classes + 1).sum())
      conf = rng.choice(np.float32([1, 0.8, -1]), k)
      lines.append(annotations.format_line(f"p{part}_{n}", idx, conf))
      rows.append(annotations.parse_line(lines[-1]))
    path = tmp_path / f"list_{part}.txt"
    path.write_text("\n".join(lines) + "\n")
    paths.append(path)
  return paths, rows


def test_stats_match_reference(tmp_path):
  num_classes = 60
  paths, rows = write_lists(tmp_path, num_classes)
  result = stats.compute_stats(paths, num_classes)
  counts = np.zeros(num_classes, int)
  tags = []
  for _, idx, conf in rows:
    counts[idx[conf > 0]] += 1
    tags.append(int((conf > 0).sum()))
  np.testing.assert_array_equal(result.images_per_class, counts)
  np.testing.assert_array_equal(result.tags_per_image, np.bincount(tags))
  tree = Hierarchy.from_arrays([f"n{i}" for i in range(num_classes)],
                               [f"c{i}" for i in range(num_classes)],
                               [-1] * num_classes)
  summary = result.summary(tree)
  assert summary["num_images"] == 5000
  assert summary["num_classes"] == int((counts > 0).sum())
  assert summary["num_trainable_classes"] == int((counts > 100).sum())
  assert 0 < summary["num_trainable_classes"] < summary["num_classes"]
  assert summary["avg_tags_per_image"] == pytest.approx(sum(tags) / 5000)
  assert summary["avg_images_per_class"] == pytest.approx(
      counts.sum() / (counts > 0).sum())
  top = summary["top_classes"][0]
  assert top["index"] == int(np.argmax(counts)) and top["name"] == \
      f"c{top['index']}"
  json.dumps(summary)  # Serialisable as is.


def test_figures_are_pngs_with_the_original_look(tmp_path):
  counts = np.array([0, 1, 5, 50, 200, 3000, 120, 99, 101], np.int64)
  result = stats.LabelStats(counts, np.bincount([0, 2, 2, 8, 8, 8, 60]))
  stats.plot_images_per_class(result, tmp_path / "per_class.png")
  stats.plot_tags_histogram(result, tmp_path / "hist.png")
  for name in ("per_class.png", "hist.png"):
    image = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
    assert image.shape[0] > 400 and image.shape[1] > 800
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    orange = (r > 200) & (g > 100) & (g < 200) & (b < 100)
    assert orange.sum() > 100
  image = np.asarray(Image.open(tmp_path / "per_class.png").convert("RGB"))
  green = (image[..., 1] > 100) & (image[..., 0] < 50) & (image[..., 2] < 50)
  assert green.sum() > 500  # The trainable threshold line.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hist.png",
                                                        "per_class.png"]
