"""A small, learnable, fully deterministic stand-in for ML-Images.

The `ml_images/synthetic` TFDS config is built from this module with no input at
all, so the README demo and fast tests exercise the real multi-label code path
(hierarchy metadata, sparse labels closed over ancestors, JPEG images) in
seconds. The task is designed to be learned by a tiny ResNet in a few hundred
steps at 64x64: big, high-contrast objects whose leaf category is a distinct
(shape, colour family) pair.

Hierarchy (45 categories, 4 levels, 3 roots)::

  round | angular | linear                          (roots, depth 0)
    disc, ring | square, triangle | cross, stripe   (shapes, depth 1)
      warm <shape>, cool <shape>                    (depth 2)
        red/yellow <shape>, green/blue <shape>      (leaves, depth 3)

Each image holds 1-3 objects on a dark noisy background; an image's labels are
every object's leaf plus its ancestors, all at confidence 1.

Single-label variant (fine-tuning demo): `NUM_SINGLE_LABEL_CLASSES` = 6 classes,
the shape (depth-1 category) of the image's dominant (largest) object. The
generator guarantees that the dominant object has the lowest-ranked shape
present, so the class is a function of the labels alone:
`single_label(indices) = min(single_label_table()[indices])`.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from mlimages_jax.data import closure
from mlimages_jax.data import hierarchy as hierarchy_lib

ROOTS = ("round", "angular", "linear")
# (shape name, root index); the order is the single-label class order.
SHAPES = (("disc", 0), ("ring", 0), ("square", 1), ("triangle", 1),
          ("cross", 2), ("stripe", 2))
# (colour name, temperature group index, RGB centre).
COLOURS = (("red", 0, (220, 40, 40)), ("yellow", 0, (230, 210, 40)),
           ("green", 1, (40, 190, 60)), ("blue", 1, (50, 90, 230)))
TEMPERATURES = ("warm", "cool")

NUM_SINGLE_LABEL_CLASSES = len(SHAPES)
SINGLE_LABEL_NAMES = tuple(name for name, _ in SHAPES)

DEFAULT_IMAGE_SIZE = 64
DEFAULT_SPLIT_SIZES = {"train": 3000, "validation": 500}
DEFAULT_SEED = 0
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
_COLOUR_JITTER = 30
_SAFE_FRACTION = 0.8
_JPEG_QUALITY = 90


def _categories() -> tuple[list[str], list[int], list[int], list[int]]:
  """(names, parents, shape index or -1, leaf (shape, colour) flat id or -1)."""
  names, parents, shape_of, leaf_of = [], [], [], []

  def add(name: str, parent: int, shape: int = -1, leaf: int = -1) -> int:
    names.append(name)
    parents.append(parent)
    shape_of.append(shape)
    leaf_of.append(leaf)
    return len(names) - 1

  roots = [add(name, -1) for name in ROOTS]
  for s, (shape, root) in enumerate(SHAPES):
    shape_node = add(shape, roots[root], shape=s)
    for t, temperature in enumerate(TEMPERATURES):
      temp_node = add(f"{temperature} {shape}", shape_node)
      for c, (colour, group, _) in enumerate(COLOURS):
        if group == t:
          add(f"{colour} {shape}", temp_node, leaf=s * len(COLOURS) + c)
  return names, parents, shape_of, leaf_of


_NAMES, _PARENTS, _SHAPE_OF, _LEAF_OF = _categories()
# _LEAF_INDEX[shape, colour] -> category index of that leaf.
_LEAF_INDEX = np.asarray(
    [_LEAF_OF.index(flat) for flat in range(len(SHAPES) * len(COLOURS))],
    np.int32).reshape(len(SHAPES), len(COLOURS))


def synthetic_hierarchy() -> hierarchy_lib.Hierarchy:
  """The built-in 45-category hierarchy (ids `syn0000`..., see module doc)."""
  wnids = [f"syn{i:04d}" for i in range(len(_NAMES))]
  return hierarchy_lib.Hierarchy.from_arrays(wnids, _NAMES, _PARENTS)


def single_label_table() -> np.ndarray:
  """int32 [num_classes]: the shape rank of depth-1 categories, else K.

  `min(table[labels])` over an example's positive labels is its single-label
  class (see module doc); written as a table so input pipelines can apply it
  with a gather and a min in TensorFlow or NumPy.
  """
  shape_of = np.asarray(_SHAPE_OF, np.int32)
  return np.where(shape_of >= 0, shape_of,
                  NUM_SINGLE_LABEL_CLASSES).astype(np.int32)


def single_label(indices: np.ndarray) -> int:
  """Single-label class (the dominant object's shape) of a synthetic example."""
  value = int(single_label_table()[np.asarray(indices, np.int64)].min())
  if value >= NUM_SINGLE_LABEL_CLASSES:
    raise ValueError(f"labels {list(indices)} contain no shape category")
  return value


@dataclasses.dataclass(frozen=True)
class SyntheticObject:
  """One drawn object: its category and geometry (pixels)."""
  shape: int
  colour: int
  centre: tuple[float, float]
  radius: float
  angle: float

  @property
  def leaf(self) -> int:
    return int(_LEAF_INDEX[self.shape, self.colour])


def sample_objects(rng: np.random.Generator,
                   image_size: int) -> list[SyntheticObject]:
  """1-3 objects; the first is the dominant one (largest, lowest shape rank).

  Secondary shapes are drawn from ranks >= the dominant's so that the
  single-label class is recoverable from the labels. Objects lie inside the
  central `_SAFE_FRACTION` of the image, so the usual evaluation centre crop
  (80%) never cuts a labelled object off, and are placed to overlap as little
  as a few tries allow, so every labelled object is visible.
  """
  count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
  dominant = int(rng.integers(len(SHAPES)))
  shapes = [dominant] + [int(rng.integers(dominant, len(SHAPES)))
                         for _ in range(count - 1)]
  radii = [image_size * rng.uniform(0.18, 0.24)] + [
      image_size * rng.uniform(0.12, 0.15) for _ in range(count - 1)]
  margin = image_size * (1 - _SAFE_FRACTION) / 2
  objects: list[SyntheticObject] = []
  for shape, radius in zip(shapes, radii):
    best, best_gap = None, -np.inf
    for _ in range(20):
      centre = tuple(rng.uniform(margin + radius,
                                 image_size - margin - radius, size=2))
      gap = min((np.hypot(centre[0] - o.centre[0], centre[1] - o.centre[1])
                 - radius - o.radius for o in objects), default=np.inf)
      if gap > best_gap:
        best, best_gap = centre, gap
      if gap >= 0:
        break
    objects.append(SyntheticObject(
        shape=shape, colour=int(rng.integers(len(COLOURS))), centre=best,
        radius=float(radius), angle=float(rng.uniform(0, 2 * np.pi))))
  return objects


def _polygon(centre, radius, angle, points) -> list[tuple[float, float]]:
  """Vertices of `points` (unit-radius (x, y)) rotated, scaled and moved."""
  c, s = np.cos(angle), np.sin(angle)
  return [(centre[0] + radius * (c * x - s * y),
           centre[1] + radius * (s * x + c * y)) for x, y in points]


_TRIANGLE = [(np.cos(a), np.sin(a))
             for a in np.pi / 2 + 2 * np.pi / 3 * np.arange(3)]
_SQUARE = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
_STRIPE = [(-1.0, -0.28), (1.0, -0.28), (1.0, 0.28), (-1.0, 0.28)]
_CROSS_ARM = [(-1.0, -0.25), (1.0, -0.25), (1.0, 0.25), (-1.0, 0.25)]


def _draw(draw: ImageDraw.ImageDraw, obj: SyntheticObject,
          fill: tuple[int, int, int]) -> None:
  (x, y), r = obj.centre, obj.radius
  name = SHAPES[obj.shape][0]
  if name == "disc":
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
  elif name == "ring":
    draw.ellipse([x - r, y - r, x + r, y + r], outline=fill,
                 width=max(2, int(r * 0.35)))
  elif name == "square":
    draw.polygon(_polygon(obj.centre, r, obj.angle, _SQUARE), fill=fill)
  elif name == "triangle":
    draw.polygon(_polygon(obj.centre, r, obj.angle, _TRIANGLE), fill=fill)
  elif name == "cross":
    draw.polygon(_polygon(obj.centre, r, obj.angle, _CROSS_ARM), fill=fill)
    draw.polygon(_polygon(obj.centre, r, obj.angle + np.pi / 2, _CROSS_ARM),
                 fill=fill)
  elif name == "stripe":
    draw.polygon(_polygon(obj.centre, r, obj.angle, _STRIPE), fill=fill)
  else:
    raise AssertionError(name)


def render(rng: np.random.Generator, objects: list[SyntheticObject],
           image_size: int) -> np.ndarray:
  """uint8 [H, W, 3]: dark noisy background, secondaries first, dominant last."""
  level = rng.uniform(10, 60)
  background = level + rng.normal(0, 6, size=(image_size, image_size, 1))
  image = Image.fromarray(
      np.clip(np.repeat(background, 3, axis=2), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for obj in reversed(objects):
    centre = np.asarray(COLOURS[obj.colour][2], np.float64)
    fill = np.clip(centre + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3),
                   0, 255)
    _draw(draw, obj, tuple(int(v) for v in fill))
  return np.asarray(image)


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
  """One generated image with its labels and what was drawn."""
  key: str
  jpeg: bytes
  labels: np.ndarray        # int32, sorted, closed over ancestors (or not).
  confidences: np.ndarray   # float32, all 1.
  objects: tuple[SyntheticObject, ...]


def generate_example(hierarchy: hierarchy_lib.Hierarchy, split: str,
                     index: int, *, image_size: int = DEFAULT_IMAGE_SIZE,
                     seed: int = DEFAULT_SEED,
                     close: bool = True) -> SyntheticExample:
  """Example `index` of `split`; a pure function of its arguments.

  Its labels are the drawn leaves, closed over the hierarchy unless `close`
  is False (the builder's ``label_closure="as_given"``).

  Seeding per example (not per stream) makes any example reproducible on its
  own, so builds can be split across workers and still give the same bytes.
  """
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
  objects = sample_objects(rng, image_size)
  pixels = render(rng, objects, image_size)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  leaves = np.unique(np.asarray([o.leaf for o in objects], np.int32))
  indices, confidences = leaves, np.ones(len(leaves), np.float32)
  if close:
    indices, confidences = closure.augment(hierarchy, indices, confidences)
  return SyntheticExample(
      key=f"{split}_{index:06d}", jpeg=buffer.getvalue(), labels=indices,
      confidences=confidences, objects=tuple(objects))


def generate_split(hierarchy: hierarchy_lib.Hierarchy, split: str,
                   num_examples: int, *, image_size: int = DEFAULT_IMAGE_SIZE,
                   seed: int = DEFAULT_SEED,
                   close: bool = True) -> Iterator[SyntheticExample]:
  """Examples 0..num_examples-1 of `split` (what the TFDS config builds)."""
  for index in range(num_examples):
    yield generate_example(hierarchy, split, index, image_size=image_size,
                           seed=seed, close=close)
