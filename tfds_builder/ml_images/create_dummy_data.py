"""Writes manual directories for the ml_images builder: `dummy_data/` and tests.

`python -m mlimages_jax.datasets.ml_images.create_dummy_data` regenerates the
committed `dummy_data/` (deterministic: same bytes every run). Tests and the benchmark
use the same functions to build bigger or deliberately broken directories.
"""

from __future__ import annotations

import io
import pathlib
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from mlimages_jax.data import annotations as annotations_lib
from mlimages_jax.data import cooccurrence
from mlimages_jax.data import hierarchy as hierarchy_lib

DUMMY_DATA = pathlib.Path(__file__).resolve().parent / "dummy_data"
IMAGE_KINDS = ("jpeg", "png", "gray", "cmyk", "corrupt")

# A made-up 10-category forest with a repeated name ("bank") and parents that
# come after their children, as in the real file.
_DUMMY_CATEGORIES = (  # (wnid, parent index, name)
    ("d0000009", 6, "dog"),
    ("d0000001", -1, "thing"),
    ("d0000002", 1, "bank"),
    ("d0000003", -1, "matter"),
    ("d0000004", 3, "water"),
    ("d0000005", 3, "rock"),
    ("d0000006", 1, "animal"),
    ("d0000007", 6, "cat"),
    ("d0000008", 4, "bank"),
    ("d0000010", 2, "river bank"),
)


def dummy_hierarchy() -> hierarchy_lib.Hierarchy:
  wnids, parents, names = zip(*_DUMMY_CATEGORIES)
  return hierarchy_lib.Hierarchy.from_arrays(wnids, names, parents)


def _smooth(rng: np.random.Generator, size: tuple[int, int],
            mode: str) -> Image.Image:
  """Blurry random colours: like a photo, JPEG keeps them close to exact."""
  channels = 3 if mode == "RGB" else 1
  coarse = rng.integers(0, 256, (4, 5, channels), dtype=np.uint8)
  return Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse,
                         mode).resize(size, Image.BILINEAR)


def dummy_pairs(hierarchy: hierarchy_lib.Hierarchy
                ) -> cooccurrence.CooccurrencePairs:
  """A river "bank" also shows "rock"; a "cat" also shows "water"."""
  return cooccurrence.CooccurrencePairs(
      num_classes=hierarchy.num_classes, sources=np.int32([7, 8]),
      targets=np.int32([4, 5]), confidences=np.float32([0.8, 0.7]))


def write_manual_root(root: pathlib.Path,
                      hierarchy: hierarchy_lib.Hierarchy) -> None:
  """The hierarchy and co-occurrence files at the top of a manual dir."""
  hierarchy.write(root / "dictionary_and_semantic_hierarchy.txt")
  dummy_pairs(hierarchy).save(root / cooccurrence.PAIRS_FILE_NAME, hierarchy)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def image_bytes(kind: str, rng: np.random.Generator,
                size: tuple[int, int] = (40, 30)) -> bytes:
  """Encoded image of `kind` (see IMAGE_KINDS); "corrupt" is a cut-off JPEG."""
  image = _smooth(rng, size, "RGB")
  if kind in ("jpeg", "corrupt"):
    data = jpeg_bytes(image)
  elif kind == "png":
    rgba = image.convert("RGBA")
    rgba.putalpha(_smooth(rng, size, "L"))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    data = buffer.getvalue()
  elif kind == "gray":
    data = jpeg_bytes(image.convert("L"))
  elif kind == "cmyk":
    data = jpeg_bytes(image.convert("CMYK"))
  else:
    raise ValueError(f"unknown image kind {kind!r}; one of {IMAGE_KINDS}")
  return data[:len(data) // 2] if kind == "corrupt" else data


def random_labels(rng: np.random.Generator, num_classes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """1-3 distinct classes with confidences from {1, 0.9, 0.8}."""
  indices = np.sort(rng.choice(num_classes, size=int(rng.integers(1, 4)),
                               replace=False)).astype(np.int32)
  confidences = rng.choice(np.float32([1.0, 0.9, 0.8]), size=len(indices))
  return indices, confidences.astype(np.float32)


def write_split(split_dir: pathlib.Path,
                images: Sequence[tuple[str, bytes | None]],
                annotations: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
  """Writes `im_list.txt` and `images/`; a None image is listed but absent."""
  (split_dir / "images").mkdir(parents=True, exist_ok=True)
  lines = []
  for (file_name, data), (indices, confidences) in zip(images, annotations):
    if data is not None:
      (split_dir / "images" / file_name).write_bytes(data)
    lines.append(annotations_lib.format_line(file_name, indices, confidences)
                 + "\n")
  (split_dir / "im_list.txt").write_text("".join(lines), encoding="utf-8")


def legacy_example(name: str, image: bytes, dense_labels: np.ndarray) -> bytes:
  """A serialized tf.train.Example in the original project's format (§5)."""
  import tensorflow as tf
  with Image.open(io.BytesIO(image)) as im:
    width, height = im.size

  def int64(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

  def raw(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  return tf.train.Example(features=tf.train.Features(feature={
      "width": int64(width), "height": int64(height), "image": raw(image),
      "label": raw(np.asarray(dense_labels, "<f4").tobytes()),
      "name": raw(name.encode("utf-8")),
  })).SerializeToString(deterministic=True)


def write_legacy_records(path: pathlib.Path, records: Iterable[bytes]) -> None:
  import tensorflow as tf
  path.parent.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(str(path)) as writer:
    for record in records:
      writer.write(record)


# Image kinds per (part, split) in dummy_data/: every conversion path, no
# broken files (those are built by the tests, with their own thresholds).
_DUMMY_SPLITS = {
    ("openimages", "train"): ("jpeg", "png", "gray", "cmyk"),
    ("openimages", "validation"): ("jpeg", "cmyk"),
    ("imagenet", "train"): ("jpeg", "gray", "jpeg"),
    ("imagenet", "validation"): ("png", "jpeg"),
}
_DUMMY_LEGACY = {"train": 3, "validation": 2}


def create_dummy_data(root: pathlib.Path = DUMMY_DATA, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  hierarchy = dummy_hierarchy()
  write_manual_root(root, hierarchy)
  for (part, split), kinds in _DUMMY_SPLITS.items():
    images = [(f"{part}_{split}_{i}.{'png' if k == 'png' else 'jpg'}",
               image_bytes(k, rng)) for i, k in enumerate(kinds)]
    write_split(root / part / split, images,
                [random_labels(rng, hierarchy.num_classes) for _ in kinds])
  for split, count in _DUMMY_LEGACY.items():
    records = []
    for i in range(count):
      dense = np.zeros(hierarchy.num_classes, np.float32)
      indices, confidences = random_labels(rng, hierarchy.num_classes)
      dense[indices] = confidences
      # Original vectors may hold -1 (ignore) on an unlabelled class.
      dense[np.setdiff1d(np.arange(hierarchy.num_classes), indices)[0]] = -1.0
      records.append(legacy_example(f"im_{i}.jpeg", image_bytes("jpeg", rng),
                                    dense))
    write_legacy_records(root / "tfrecords" / split / "0.tfrecords", records)


if __name__ == "__main__":
  create_dummy_data()
