"""Tests of the synthetic ML-Images stand-in (mlimages_jax/data/synthetic.py)."""

from __future__ import annotations

import io
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.preprocessing import StandardScaler

from mlimages_jax.train import losses
from mlimages_jax.data import synthetic

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import pretrain  # noqa: E402


@pytest.fixture(scope="module")
def hierarchy():
  return synthetic.synthetic_hierarchy()


def _closure(hierarchy, leaves) -> list[int]:
  """Reference: every leaf and every parent up to the root, sorted."""
  out = set()
  for leaf in leaves:
    i = int(leaf)
    while i >= 0:
      out.add(i)
      i = int(hierarchy.parents[i])
  return sorted(out)


def test_hierarchy_shape(hierarchy):
  assert hierarchy.num_classes == 45
  roots = hierarchy.roots()
  assert [hierarchy.names[r] for r in roots] == ["round", "angular", "linear"]
  assert np.bincount(hierarchy.depth).tolist() == [3, 6, 12, 24]
  leaves = hierarchy.leaves()
  assert len(leaves) == 24
  # Each leaf is a distinct (colour, shape) pair under its shape and group.
  pairs = set()
  for leaf in leaves:
    colour, shape = hierarchy.names[leaf].split()
    temperature, shape_again = hierarchy.names[hierarchy.parent(leaf)].split()
    assert shape_again == shape
    assert hierarchy.names[hierarchy.parent(hierarchy.parent(leaf))] == shape
    assert temperature == ("warm" if colour in ("red", "yellow") else "cool")
    pairs.add((colour, shape))
  assert len(pairs) == 24
  assert len(set(hierarchy.wnids)) == 45


def test_examples_are_deterministic(hierarchy):
  a = synthetic.generate_example(hierarchy, "train", 7)
  b = synthetic.generate_example(hierarchy, "train", 7)
  assert a.jpeg == b.jpeg
  np.testing.assert_array_equal(a.labels, b.labels)
  assert synthetic.generate_example(hierarchy, "validation", 7).jpeg != a.jpeg
  assert synthetic.generate_example(hierarchy, "train", 7, seed=1).jpeg != a.jpeg
  streamed = list(synthetic.generate_split(hierarchy, "train", 8))
  assert streamed[7].jpeg == a.jpeg
  assert [e.key for e in streamed[:2]] == ["train_000000", "train_000001"]


def test_labels_objects_and_single_label(hierarchy):
  table = synthetic.single_label_table()
  assert table.shape == (45,)
  shape_nodes = np.flatnonzero(table < synthetic.NUM_SINGLE_LABEL_CLASSES)
  assert [hierarchy.names[i] for i in shape_nodes] == list(
      synthetic.SINGLE_LABEL_NAMES)
  counts, classes = np.zeros(4, int), np.zeros(6, int)
  for ex in synthetic.generate_split(hierarchy, "train", 300):
    leaves = [o.leaf for o in ex.objects]
    assert ex.labels.tolist() == _closure(hierarchy, leaves)
    assert ex.labels.dtype == np.int32
    np.testing.assert_array_equal(ex.confidences, np.ones(len(ex.labels)))
    for obj in ex.objects:
      assert hierarchy.names[obj.leaf] == (
          f"{synthetic.COLOURS[obj.colour][0]} "
          f"{synthetic.SHAPES[obj.shape][0]}")
    dominant = ex.objects[0]
    assert all(dominant.radius > o.radius for o in ex.objects[1:])
    assert all(dominant.shape <= o.shape for o in ex.objects[1:])
    assert synthetic.single_label(ex.labels) == dominant.shape
    counts[len(ex.objects)] += 1
    classes[dominant.shape] += 1
  assert counts[0] == 0 and counts[1:].min() > 30
  assert classes.min() > 25  # Every single-label class is common.
  with pytest.raises(ValueError, match="no shape category"):
    synthetic.single_label(np.int32([0, 1]))


def test_images_show_the_labelled_objects(hierarchy):
  for index in range(50):
    ex = synthetic.generate_example(hierarchy, "validation", index)
    with Image.open(io.BytesIO(ex.jpeg)) as image:
      assert (image.format, image.mode, image.size) == ("JPEG", "RGB",
                                                        (64, 64))
      pixels = np.asarray(image, np.float64)
    dominant = ex.objects[0]  # Drawn last, so nothing covers it.
    if synthetic.SHAPES[dominant.shape][0] == "ring":
      continue  # Hollow in the middle.
    x, y = (int(round(v)) for v in dominant.centre)
    centre = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
    colours = np.asarray([c[2] for c in synthetic.COLOURS], np.float64)
    nearest = np.argmin(((colours - centre) ** 2).sum(1))
    assert nearest == dominant.colour, (index, centre)


def _shape_features(pixels: np.ndarray) -> np.ndarray:
  """Per colour family: size, fill, hole and elongation of its blobs."""
  colours = np.asarray([c[2] for c in synthetic.COLOURS], np.float32)
  distance = ((pixels[..., None, :] - colours) ** 2).sum(-1)
  family = distance.argmin(-1)
  bright = pixels.max(-1) > 100
  features = []
  for k in range(len(colours)):
    blobs, count = ndimage.label(bright & (family == k))
    stats = []
    for i in range(1, count + 1):
      blob = blobs == i
      area = blob.sum()
      if area < 15:
        continue
      ys, xs = np.nonzero(blob)
      box = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
      eig = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])) + 1e-3 * np.eye(2))
      stats.append([np.log(area), area / box,
                    area / ndimage.binary_fill_holes(blob).sum(),
                    eig[0] / eig[1], ndimage.binary_erosion(blob).sum() / area])
    stats = np.asarray(stats).reshape(-1, 5)
    features.append(np.concatenate([
        stats.max(0) if len(stats) else np.zeros(5),
        stats.min(0) if len(stats) else np.zeros(5), [len(stats)]]))
  return np.concatenate(features)


def _dataset(hierarchy, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  features, targets = [], []
  for ex in synthetic.generate_split(hierarchy, split, n):
    with Image.open(io.BytesIO(ex.jpeg)) as image:
      features.append(_shape_features(np.asarray(image, np.float32)))
    target = np.zeros(hierarchy.num_classes, np.float32)
    target[ex.labels] = 1
    targets.append(target)
  return np.stack(features), np.stack(targets)


def test_labels_are_learnable_by_a_shallow_baseline(hierarchy):
  """Logistic regression on hand-made blob features (no deep network).

  Far above chance means the labels really describe the pictures; a tiny
  ResNet, which learns better features, has an easier job still.
  """
  x_train, y_train = _dataset(hierarchy, "train", 800)
  x_val, y_val = _dataset(hierarchy, "validation", 300)
  scaler = StandardScaler().fit(x_train)
  x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
  aps, chance = [], []
  for c in range(hierarchy.num_classes):
    if not y_val[:, c].any() or y_train[:, c].all():
      continue
    model = LogisticRegression(max_iter=500).fit(x_train, y_train[:, c])
    aps.append(average_precision_score(y_val[:, c],
                                       model.decision_function(x_val)))
    chance.append(y_val[:, c].mean())
  assert len(aps) >= 40
  assert np.mean(chance) < 0.2
  assert np.mean(aps) > 0.65, (np.mean(aps), np.mean(chance))


def _positive_coefficients(labels: np.ndarray, batch_size: int, loss_config,
                           steps: int = 150, skip: int = 20) -> np.ndarray:
  """Mean §7 coefficient of each class over the batches where it is positive.

  The coefficients depend only on which classes are positive in each batch
  (and the negative-sampling draws), not on the model, so shuffled label
  batches through `losses.class_coefficients` give the values training uses.
  """
  rng = np.random.default_rng(0)
  epochs = steps * batch_size // len(labels) + 1
  order = np.concatenate([rng.permutation(len(labels)) for _ in range(epochs)])
  update = jax.jit(losses.class_coefficients)
  state = losses.init_loss_state(labels.shape[1])
  total, count = np.zeros(labels.shape[1]), np.zeros(labels.shape[1])
  for step in range(steps):
    batch = labels[order[step * batch_size:(step + 1) * batch_size]]
    positive = (batch >= loss_config.mask_thres).any(0).astype(np.float32)
    selected = (rng.random(labels.shape[1]) <= loss_config.neg_select
                ).astype(np.float32)
    coef, state = update(jnp.asarray(positive), jnp.asarray(selected), state)
    if step >= skip:
      total += np.asarray(coef) * positive
      count += positive
  return total / np.maximum(count, 1)


def test_demo_batches_keep_the_adaptive_coefficients_apart(hierarchy):
  """The demo's §7 loss: frequent classes at the floor, rarer ones weigh more.

  configs/pretrain.py:demo's batch size decides whether the class weighting
  does anything. In ML-Images the generic classes are positive in every
  batch (coefficient 0.01) and the specific ones now and then (up to 1). In
  batches of 64 all 45 synthetic classes are positive almost every time, so
  nearly every class is pinned at the floor; the demo's batches of 16 restore
  the contrast.
  """
  config = pretrain.get_config("demo")
  assert config.loss.name == "adaptive_sigmoid"
  assert (config.loss.pos_weight, config.loss.mask_thres,
          config.loss.neg_select) == (12.0, 0.7, 0.1)  # The recipe's.
  labels = np.zeros((960, hierarchy.num_classes), np.float32)
  for i, ex in enumerate(synthetic.generate_split(hierarchy, "train", 960)):
    labels[i, ex.labels] = ex.confidences
  depth = hierarchy.depth
  demo = _positive_coefficients(labels, config.batch_size, config.loss)
  by_depth = [demo[depth == d].mean() for d in range(4)]
  assert by_depth[0] < 0.02  # The 3 roots: in every batch, at the floor.
  assert by_depth[3] > 0.4  # The 24 leaves: weighted up.
  assert by_depth == sorted(by_depth)  # Rarer classes weigh more.
  assert (demo[depth == 3] > 0.2).all()  # No leaf pinned.
  dense = _positive_coefficients(labels, 64, config.loss)
  assert dense[depth == 3].mean() < 0.15 and dense[depth < 3].max() < 0.05
