"""Dataset statistics of annotation lists and the two figures of ML-Images §1.

Counts are streamed over any number of lists, so the full 17.6M-image lists
fit in O(classes) memory. A tag counts when its confidence is positive (-1
means "ignore" and 0 "absent"). ``avg_images_per_class`` is the number of
positive tags divided by the number of classes with at least one image.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from mlimages_jax.fileio import PathLike, atomic_writer
from mlimages_jax.data.annotation_reader import AnnotationReader
from mlimages_jax.data.hierarchy import Hierarchy

TRAINABLE_MIN_IMAGES = 100  # "Trainable": more than this many images.
MAX_TAGS_BIN = 50  # The histogram's last bar is ">= 50", as in the original.


@dataclasses.dataclass
class LabelStats:
  """Per-class image counts and the tags-per-image histogram."""

  images_per_class: np.ndarray  # int64 [C]
  tags_per_image: np.ndarray  # int64 histogram: [k] = images with k tags.
  invalid: int = 0

  @property
  def num_images(self) -> int:
    return int(self.tags_per_image.sum())

  def summary(self, hierarchy: Hierarchy | None = None, *,
              trainable_min_images: int = TRAINABLE_MIN_IMAGES,
              top: int = 10) -> dict[str, object]:
    """The JSON of `mlimages labels stats`."""
    counts = self.images_per_class
    num_images = self.num_images
    num_tags = int(counts.sum())
    num_classes = int((counts > 0).sum())
    order = np.argsort(-counts, kind="stable")[:top]
    result = {
        "num_images": num_images,
        "num_classes": num_classes,
        "num_trainable_classes": int((counts > trainable_min_images).sum()),
        "trainable_min_images": trainable_min_images,
        "avg_tags_per_image": num_tags / num_images if num_images else 0.0,
        "avg_images_per_class": num_tags / num_classes if num_classes else 0.0,
        "num_tags": num_tags,
        "max_tags_per_image": int(np.flatnonzero(self.tags_per_image).max(
            initial=0)),
        "num_invalid_lines": self.invalid,
        "top_classes": [
            {"index": int(i), "images": int(counts[i]),
             **({"wnid": hierarchy.wnids[i], "name": hierarchy.names[i]}
                if hierarchy is not None else {})}
            for i in order if counts[i] > 0],
    }
    return result


def compute_stats(paths: Sequence[PathLike], num_classes: int, *,
                  skip_invalid: bool = False,
                  progress: Callable[[int], None] | None = None) -> LabelStats:
  """Streams annotation lists and counts images per class and tags per image."""
  counts = np.zeros(num_classes, np.int64)
  histogram = np.zeros(1, np.int64)
  invalid = 0
  done = 0
  for path in paths:
    reader = AnnotationReader(path, num_classes=num_classes,
                              skip_invalid=skip_invalid)
    for batch in reader.batches():
      positive = batch.confidences > 0
      counts += np.bincount(batch.indices[positive], minlength=num_classes)
      rows = np.repeat(np.arange(len(batch)), np.diff(batch.indptr))
      tags = np.bincount(np.bincount(rows[positive], minlength=len(batch)))
      if len(tags) > len(histogram):
        histogram = np.pad(histogram, (0, len(tags) - len(histogram)))
      histogram[:len(tags)] += tags
      if progress is not None:
        progress(done + reader.bytes_read)
    invalid += reader.num_invalid
    done += reader.total_bytes
  return LabelStats(counts, histogram, invalid)


def plot_images_per_class(stats: LabelStats, path: PathLike, *,
                          trainable_min_images: int = TRAINABLE_MIN_IMAGES
                          ) -> None:
  """log2(images) per class, sorted, with the trainable threshold (PNG)."""
  counts = np.sort(stats.images_per_class[stats.images_per_class > 0])[::-1]
  values = np.log2(counts)
  fig, ax = _figure((10.0, 6.0))
  x = np.arange(len(values))
  ax.fill_between(x, values, color="#fbd9a5", linewidth=0)
  ax.plot(x, values, color="darkorange", linewidth=3)
  threshold = np.log2(trainable_min_images)
  ax.axhline(threshold, color="green", linewidth=3,
             label=f"trainable: > {trainable_min_images} images "
             f"({int((counts > trainable_min_images).sum())} classes)")
  ax.set_xlim(0, max(len(values) - 1, 1))
  ax.set_ylim(0, max(float(values.max(initial=0)), threshold) * 1.05)
  ax.set_xlabel("Class Index", fontsize=18)
  ax.set_ylabel("Log2(Number of images)", fontsize=18)
  ax.tick_params(labelsize=14)
  ax.legend(fontsize=13, loc="upper right")
  _save(fig, path)


def plot_tags_histogram(stats: LabelStats, path: PathLike) -> None:
  """Histogram of tags per image, the last bar collecting ">= 50" (PNG)."""
  hist = np.zeros(MAX_TAGS_BIN + 1, np.int64)
  head = stats.tags_per_image[:MAX_TAGS_BIN]
  hist[:len(head)] = head
  hist[MAX_TAGS_BIN] = stats.tags_per_image[MAX_TAGS_BIN:].sum()
  fig, ax = _figure((14.0, 7.5))
  ax.bar(np.arange(MAX_TAGS_BIN + 1), hist, width=0.6, color="#fdb44b",
         edgecolor="black", linewidth=1.5)
  ax.set_xlim(0, MAX_TAGS_BIN)
  ticks = list(range(0, MAX_TAGS_BIN, 10)) + [MAX_TAGS_BIN]
  ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + [f">={MAX_TAGS_BIN}"])
  ax.ticklabel_format(axis="y", style="plain")
  ax.set_xlabel("Number of Annotated Tags", fontsize=18)
  ax.set_ylabel("Number of Images", fontsize=18)
  ax.tick_params(labelsize=13)
  _save(fig, path)


def _figure(size: tuple[float, float]):
  # matplotlib is imported here, not at module import: the label tools must
  # start fast. Figure + Agg needs no pyplot state and no display.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=size, dpi=100, layout="tight")
  return fig, fig.add_subplot()


def _save(fig, path: PathLike) -> None:
  with atomic_writer(path, "wb") as f:
    fig.savefig(f, format="png")
