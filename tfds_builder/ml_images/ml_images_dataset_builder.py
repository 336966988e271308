"""ml_images: Tencent ML-Images as TFDS, with hierarchy-augmented sparse labels.

One example per image: the image as an RGB JPEG (JPEG sources byte-for-byte),
its file name, its source part, and sparse `labels` (ClassLabel keyed by wnid)
with aligned `confidences` (-1 = ignore), closed over the hierarchy (plus
co-occurrence pairs when `cooccurrence_pairs.tsv` is in the manual directory)
unless the config's `label_closure` is "as_given". The hierarchy and that
choice travel in `info.metadata` ({"wnids", "names", "parents",
"label_closure"}).

The manual configs become an Apache Beam pipeline when Beam options or a
runner are given (`tfds build ... --beam_pipeline_options=...`); otherwise a
single process builds them, decoding images on a thread pool.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
from typing import Any, Iterable, Iterator

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mlimages_jax import decoding
from mlimages_jax import fileio
from mlimages_jax.data import annotations
from mlimages_jax.data import closure
from mlimages_jax.data import cooccurrence
from mlimages_jax.data import hierarchy as hierarchy_lib
from mlimages_jax.data import synthetic

beam = tfds.core.lazy_imports.apache_beam

HIERARCHY_FILE = "dictionary_and_semantic_hierarchy.txt"
PAIRS_FILE = "cooccurrence_pairs.tsv"
LIST_FILE = "im_list.txt"
IMAGES_DIR = "images"
LEGACY_DIR = "tfrecords"
SPLITS = ("train", "validation")
PARTS = ("imagenet", "openimages")
_KINDS = ("manual", "legacy", "synthetic")
_JPEG_QUALITY = 95
_COUNTER_NAMESPACE = "ml_images"

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Run the acquisition tools (`mlimages download ...`, `mlimages imagenet21k
extract ...`), or arrange the files yourself, so that the manual directory
(`--manual_dir=M`) holds:

  M/dictionary_and_semantic_hierarchy.txt        (all configs but synthetic)
  M/cooccurrence_pairs.tsv                       (optional: co-occurrence pairs)
  M/imagenet/{train,validation}/im_list.txt      ("<file name>\\t<annotations>")
  M/imagenet/{train,validation}/images/<file name>
  M/openimages/{train,validation}/im_list.txt
  M/openimages/{train,validation}/images/<file name>
  M/tfrecords/{train,validation}/*.tfrecord*     (legacy: the original records)

`full` reads both parts, `imagenet` and `openimages` one each, `legacy` the
TFRecords written by the original project; `synthetic` needs nothing.
"""


class MissingManualFilesError(FileNotFoundError):
  """Files a config needs are not in the manual directory."""


class TooManyBadImagesError(RuntimeError):
  """More list lines than allowed point at missing or undecodable images."""


class UndecodableImageError(ValueError):
  """Bytes that are not an image PIL can fully decode."""


@dataclasses.dataclass
class MlImagesConfig(tfds.core.BuilderConfig):
  """A config; custom ones come from `--config='{"name": ..., ...}'`.

  TFDS forbids reusing a predefined name, so a custom config names its own,
  e.g. `{"name": "openimages_lenient", "parts": ["openimages"],
  "max_bad_fraction": 0.2}`.

  Attributes:
    kind: "manual" (image lists and images), "legacy" (original TFRecords) or
      "synthetic" (generated, no input).
    parts: the manual-directory parts a "manual" config reads.
    max_bad_fraction: the build fails when more than this fraction of a
      split's list lines have a missing or undecodable image (they are
      skipped, counted and reported either way).
    lines_per_work_unit: list lines per Beam work unit (Beam builds only).
    label_closure: "closed" (default: co-occurrence pairs, if given, then
      closure over the hierarchy) or "as_given" (the annotations exactly as
      listed, as the original's shipped lists and TFRecords are; a class
      listed twice keeps its highest confidence). Recorded in the metadata.
    num_train, num_validation, image_size, seed: the synthetic config's size,
      image side and seed.
  """
  kind: str = "manual"
  parts: tuple[str, ...] = PARTS
  max_bad_fraction: float = 0.05
  lines_per_work_unit: int = 10_000
  label_closure: str = "closed"
  num_train: int = synthetic.DEFAULT_SPLIT_SIZES["train"]
  num_validation: int = synthetic.DEFAULT_SPLIT_SIZES["validation"]
  image_size: int = synthetic.DEFAULT_IMAGE_SIZE
  seed: int = synthetic.DEFAULT_SEED

  def __post_init__(self):
    self.parts = tuple(self.parts)  # JSON gives a list.
    if self.kind not in _KINDS:
      raise ValueError(f"ml_images config {self.name!r}: kind must be one of "
                       f"{_KINDS}, got {self.kind!r}")
    if self.kind == "manual" and (not self.parts or
                                  not set(self.parts) <= set(PARTS)):
      raise ValueError(f"ml_images config {self.name!r}: parts must be a "
                       f"non-empty subset of {PARTS}, got {self.parts}")
    if self.label_closure not in closure.LABEL_CLOSURES:
      raise ValueError(f"ml_images config {self.name!r}: label_closure must "
                       f"be one of {closure.LABEL_CLOSURES}, got "
                       f"{self.label_closure!r}")
    if not 0.0 <= self.max_bad_fraction <= 1.0:
      raise ValueError(f"ml_images config {self.name!r}: max_bad_fraction "
                       f"must be in [0, 1], got {self.max_bad_fraction}")


# ---- images ------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB pixels; transparent areas become white rather than garbage."""
  if image.mode in ("RGBA", "LA", "PA") or (
      image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
    rgb.paste(rgba, mask=rgba.getchannel("A"))
    return rgb
  return image.convert("RGB")


def to_rgb_jpeg(data: bytes) -> bytes:
  """The image as RGB JPEG bytes: RGB JPEGs are returned unchanged.

  Every image is fully decoded first, so a truncated or corrupt file fails
  here (and is skipped) instead of at training time. RGB JPEGs are decoded at
  1/8 scale (libjpeg still reads the whole entropy-coded stream) and kept
  byte-for-byte; anything else (PNG, grayscale or CMYK JPEG, GIF, ...) is
  converted to RGB and encoded as JPEG.

  The project's decode policy applies (`decoding`): the pixel limit is
  checked from the header before anything is decoded, the decoding threads
  share the process's pixel budget, and 16-bit greyscale becomes 8-bit by
  `>> 8` (as OpenCV and TF read it; PIL alone would clip it to white).
  """
  try:
    header = decoding.read_header(data)
  except decoding.ImageRejected as e:
    raise UndecodableImageError(e.reason) from None
  try:
    with decoding.BUDGET.reserve(header.pixels), \
        Image.open(io.BytesIO(data)) as image:
      if image.format == "JPEG" and image.mode == "RGB":
        image.draft("RGB", (max(1, image.width // 8),
                            max(1, image.height // 8)))
        image.load()
        return data
      image.load()
      rgb = _to_rgb(decoding.to_8bit(image))
  except (OSError, SyntaxError, ValueError) as e:
    raise UndecodableImageError(f"{type(e).__name__}: {e}") from e
  buffer = io.BytesIO()
  rgb.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  return buffer.getvalue()


# ---- work items --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pending:
  """A parsed list line or legacy record whose image is not yet checked."""
  key: str
  file_name: str
  source: str
  labels: np.ndarray
  confidences: np.ndarray
  image_path: str | None = None   # Read from here, or:
  image_bytes: bytes | None = None


@dataclasses.dataclass(frozen=True)
class _ListChunk:
  """Lines [start, end) (bytes) of one image list; `end=None`: to the end."""
  part: str
  list_path: str
  images_dir: str
  start: int = 0
  end: int | None = None
  first_lineno: int = 1


def _line_chunks(part: str, list_path: epath.Path, images_dir: epath.Path,
                 lines_per_chunk: int) -> list[_ListChunk]:
  """Splits a list into chunks of whole lines, with their first line number.

  One pass over the bytes (memchr speed) gives exact line numbers, so Beam
  workers still report errors as file:line.
  """
  chunks, start, lineno, in_chunk, offset = [], 0, 1, 0, 0
  with list_path.open("rb") as f:
    for line in f:
      offset += len(line)
      in_chunk += 1
      if in_chunk == lines_per_chunk:
        chunks.append(_ListChunk(part, str(list_path), str(images_dir), start,
                                 offset, lineno))
        start, lineno, in_chunk = offset, lineno + in_chunk, 0
  if in_chunk:
    chunks.append(_ListChunk(part, str(list_path), str(images_dir), start,
                             None, lineno))
  return chunks


def _parse_chunk(chunk: _ListChunk, hierarchy: hierarchy_lib.Hierarchy,
                 pairs: Any, close: bool = True,
                 batch_lines: int = 1024) -> Iterator[_Pending]:
  """Parses and augments the lines of one chunk (LabelError: file:line).

  Lines are parsed one by one (exact errors) but augmented `batch_lines` at a
  time: the CSR batch closure costs a few microseconds per line instead of
  tens.
  """
  rows = []
  with epath.Path(chunk.list_path).open("rb") as f:
    f.seek(chunk.start)
    offset = chunk.start
    for lineno, raw in enumerate(f, start=chunk.first_lineno):
      if chunk.end is not None and offset >= chunk.end:
        break
      offset += len(raw)
      line = fileio.decode_line(raw, chunk.list_path, lineno,
                                annotations.LabelError)
      if not line.strip():
        continue
      rows.append(annotations.parse_line(
          line, num_classes=hierarchy.num_classes, source=chunk.list_path,
          lineno=lineno))
      if len(rows) == batch_lines:
        yield from _augmented(rows, chunk, hierarchy, pairs, close)
        rows = []
  yield from _augmented(rows, chunk, hierarchy, pairs, close)


def _augmented(rows: list[tuple[str, np.ndarray, np.ndarray]],
               chunk: _ListChunk, hierarchy: hierarchy_lib.Hierarchy,
               pairs: Any, close: bool) -> Iterator[_Pending]:
  """The rows' labels, closed or as given (sorted, duplicates at their max)."""
  if not rows:
    return
  sizes = [len(indices) for _, indices, _ in rows]
  indptr = np.zeros(len(rows) + 1, np.int64)
  np.cumsum(sizes, out=indptr[1:])
  indices = np.concatenate([r[1] for r in rows])
  confidences = np.concatenate([r[2] for r in rows])
  if close:
    indptr, indices, confidences = closure.augment_batch(
        hierarchy, indptr, indices, confidences, pairs=pairs)
  else:
    indptr, indices, confidences = annotations.reduce_max(
        np.repeat(np.arange(len(rows)), sizes), indices, confidences,
        len(rows), hierarchy.num_classes)
  images_dir = epath.Path(chunk.images_dir)
  for r, (file_name, _, _) in enumerate(rows):
    a, b = indptr[r], indptr[r + 1]
    yield _Pending(key=f"{chunk.part}/{file_name}", file_name=file_name,
                   source=chunk.part, labels=indices[a:b],
                   confidences=confidences[a:b],
                   image_path=str(images_dir / file_name))


def _read_legacy_file(path: str, hierarchy: hierarchy_lib.Hierarchy,
                      pairs: Any, close: bool = True) -> Iterator[_Pending]:
  """Records of the original format (§5) as sparse-labelled items.

  Their labels are the non-zero entries of the dense vector (-1 included),
  as the original wrote them from its (unclosed) lists: closed like a
  manual config's unless `close` is False.
  """
  num_classes = hierarchy.num_classes
  import tensorflow as tf  # Only legacy builds need the TFRecord reader.
  name = epath.Path(path).name
  for i, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
    feature = tf.train.Example.FromString(record).features.feature
    try:
      label = feature["label"].bytes_list.value[0]
      image = feature["image"].bytes_list.value[0]
      file_name = feature["name"].bytes_list.value[0].decode("utf-8")
    except (IndexError, KeyError) as e:
      raise ValueError(f"{path}: record {i}: not in the original ML-Images "
                       f"format (features width, height, image, label, name): "
                       f"missing {e}") from None
    if len(label) != 4 * num_classes:
      raise ValueError(f"{path}: record {i}: the label vector has "
                       f"{len(label) / 4:g} float32 values, but the hierarchy "
                       f"has {num_classes} classes")
    dense = np.frombuffer(label, "<f4")
    indices = np.flatnonzero(dense).astype(np.int32)
    confidences = dense[indices].astype(np.float32)
    if close:
      indices, confidences = closure.augment(hierarchy, indices, confidences,
                                             pairs)
    yield _Pending(key=f"{name}/{i:09d}", file_name=file_name, source="legacy",
                   labels=indices, confidences=confidences, image_bytes=image)


# ---- finishing items, counting the bad ones ----------------------------------

_OK, _MISSING, _UNDECODABLE = "ok", "missing", "undecodable"


def _finish(item: _Pending) -> tuple[str, Any]:
  """(status, (key, example)) or (status, reason) for a skipped item."""
  data = item.image_bytes
  if data is None:
    path = epath.Path(item.image_path)
    try:
      data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      return _MISSING, f"{item.key}: no file {path}"
  try:
    jpeg = to_rgb_jpeg(data)
  except UndecodableImageError as e:
    return _UNDECODABLE, f"{item.key}: {e}"
  return _OK, (item.key, {
      "image": jpeg, "file_name": item.file_name, "source": item.source,
      "labels": item.labels, "confidences": item.confidences})


def _check_counts(split: str, counts: dict[str, int],
                  max_bad_fraction: float, examples: list[str]) -> None:
  """Reports a split's skipped images; raises above `max_bad_fraction`."""
  total = sum(counts.values())
  bad = counts.get(_MISSING, 0) + counts.get(_UNDECODABLE, 0)
  summary = (f"ml_images {split}: {counts.get(_OK, 0)} of {total} examples "
             f"written, {bad} skipped ({counts.get(_MISSING, 0)} missing, "
             f"{counts.get(_UNDECODABLE, 0)} undecodable)")
  if examples:
    summary += "; e.g. " + "; ".join(examples)
  (logging.warning if bad else logging.info)(summary)
  if total == 0:
    raise TooManyBadImagesError(f"{summary}: the split has no list lines")
  if bad > max_bad_fraction * total:
    raise TooManyBadImagesError(
        f"{summary}: {bad / total:.1%} exceeds max_bad_fraction="
        f"{max_bad_fraction}; if that is expected, build a custom config, "
        f"e.g. --config='{{\"name\": \"openimages_lenient\", \"parts\": "
        f"[\"openimages\"], \"max_bad_fraction\": 0.2}}'")


def _finish_locally(items: Iterable[_Pending], counts: collections.Counter,
                    examples: list[str],
                    window: int = 64) -> Iterator[tuple[str, dict]]:
  """Finishes items on a thread pool (PIL decodes without the GIL), in order."""
  with concurrent.futures.ThreadPoolExecutor() as pool:
    pending = collections.deque()
    items = iter(items)
    while True:
      for item in items:
        pending.append(pool.submit(_finish, item))
        if len(pending) >= window:
          break
      if not pending:
        return
      status, value = pending.popleft().result()
      counts[status] += 1
      if status == _OK:
        yield value
      elif len(examples) < 5:
        examples.append(value)


def _finish_in_beam(item: _Pending, split: str) -> Iterator[tuple[str, dict]]:
  status, value = _finish(item)
  beam.metrics.Metrics.counter(_COUNTER_NAMESPACE,
                               f"{split}/{status}").inc()
  if status == _OK:
    yield value
  else:
    logging.warning("ml_images %s: skipped %s", split, value)


# ---- the builder -------------------------------------------------------------


class Builder(tfds.core.GeneratorBasedBuilder):
  """Tencent ML-Images (11,166 categories, multi-label) and friends."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      MlImagesConfig(name="full", description=(
          "Both parts: ImageNet-21k (part 1) and Open Images (part 2), 17.6M "
          "train / 88.7k validation images.")),
      MlImagesConfig(name="imagenet", parts=("imagenet",), description=(
          "Part 1 only: the ImageNet-21k images.")),
      MlImagesConfig(name="openimages", parts=("openimages",), description=(
          "Part 2 only: the Open Images images.")),
      MlImagesConfig(name="legacy", kind="legacy", parts=(), description=(
          "Converted from the original project's TFRecords.")),
      MlImagesConfig(name="synthetic", kind="synthetic", parts=(),
                     description=("Generated: 45 categories of drawn shapes, "
                                  "3,000 train / 500 validation 64x64 "
                                  "images, no input needed.")),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "full"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  builder_config_cls = MlImagesConfig
  # TFDS looks for a builder's files (README.md, CITATIONS.bib, checksums.tsv,
  # dummy_data/) where its module name points: mlimages_jax/datasets/ml_images,
  # a folder of the wheel only; a checkout has them in tfds_builder/ml_images.
  pkg_dir_path = epath.Path(__file__).parent

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._use_beam = False
    self._skipped: dict[str, dict[str, Any]] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.kind == "synthetic":
      hierarchy = synthetic.synthetic_hierarchy()
      label = tfds.features.ClassLabel(names=hierarchy.wnids)
      metadata = hierarchy.to_json_metadata()
    else:  # Known once the manual directory's hierarchy is read.
      label, metadata = tfds.features.ClassLabel(), {}
    metadata["label_closure"] = self.builder_config.label_closure
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "file_name": tfds.features.Text(),
            "source": tfds.features.Text(),
            "labels": tfds.features.Sequence(label),
            "confidences": tfds.features.Sequence(np.float32),
        }),
        metadata=tfds.core.MetadataDict(metadata),
        homepage="https://github.com/Tencent/tencent-ml-images",
    )

  def _download_and_prepare(self, dl_manager, download_config):
    # Beam only when the user asked for it: the local path is faster on one
    # machine, and a Beam build should never start by surprise.
    self._use_beam = (download_config.beam_options is not None or
                      download_config.beam_runner is not None)
    return super()._download_and_prepare(dl_manager, download_config)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    if config.kind == "synthetic":
      sizes = {"train": config.num_train, "validation": config.num_validation}
      return {split: self._generate_examples(split=split, num_examples=n)
              for split, n in sizes.items()}
    manual_dir = dl_manager.manual_dir
    hierarchy = self._read_hierarchy(manual_dir)
    pairs_path = manual_dir / PAIRS_FILE
    pairs = (cooccurrence.load_cooccurrence_pairs(pairs_path,
                                                  hierarchy.num_classes)
             if pairs_path.exists() and config.label_closure == "closed"
             else None)
    if config.kind == "legacy":
      units = self._legacy_files(manual_dir)
      return {split: self._generate_examples(
          split=split, legacy_files=units[split], hierarchy=hierarchy,
          pairs=pairs) for split in SPLITS}
    chunks = self._list_chunks(manual_dir)
    return {split: self._generate_examples(
        split=split, chunks=chunks[split], hierarchy=hierarchy, pairs=pairs)
            for split in SPLITS}

  def _read_hierarchy(self, manual_dir: epath.Path) -> hierarchy_lib.Hierarchy:
    """Reads the hierarchy and puts it in the features and the metadata."""
    path = manual_dir / HIERARCHY_FILE
    if not path.exists():
      raise MissingManualFilesError(
          f"ml_images/{self.builder_config.name}: missing {path}\n"
          f"{_MANUAL_DOWNLOAD_INSTRUCTIONS}")
    hierarchy = hierarchy_lib.Hierarchy.from_file(path)
    self.info.features["labels"].feature.names = list(hierarchy.wnids)
    self.info.metadata.update(hierarchy.to_json_metadata())
    return hierarchy

  def _require(self, missing: list[str]) -> None:
    if missing:
      raise MissingManualFilesError(
          f"ml_images/{self.builder_config.name}: the manual directory lacks "
          "these expected paths:\n  " + "\n  ".join(missing) +
          f"\n{_MANUAL_DOWNLOAD_INSTRUCTIONS}")

  def _list_chunks(self, manual_dir: epath.Path
                   ) -> dict[str, list[_ListChunk]]:
    """Every part and split the config needs, all missing ones named at once."""
    missing, sources = [], collections.defaultdict(list)
    for split in SPLITS:
      for part in self.builder_config.parts:
        list_path = manual_dir / part / split / LIST_FILE
        images_dir = manual_dir / part / split / IMAGES_DIR
        missing += [str(p) for p in (list_path, images_dir) if not p.exists()]
        sources[split].append((part, list_path, images_dir))
    self._require(missing)
    if self._use_beam:
      return {split: [chunk for part, list_path, images_dir in sources[split]
                      for chunk in _line_chunks(
                          part, list_path, images_dir,
                          self.builder_config.lines_per_work_unit)]
              for split in SPLITS}
    return {split: [_ListChunk(part, str(list_path), str(images_dir))
                    for part, list_path, images_dir in sources[split]]
            for split in SPLITS}

  def _legacy_files(self, manual_dir: epath.Path) -> dict[str, list[str]]:
    files, missing = {}, []
    for split in SPLITS:
      directory = manual_dir / LEGACY_DIR / split
      files[split] = sorted(str(p) for p in directory.glob("*.tfrecord*")
                            ) if directory.exists() else []
      if not files[split]:
        missing.append(f"{directory}/*.tfrecord*")
    self._require(missing)
    return files

  def _generate_examples(self, *, split: str, num_examples: int = 0,
                         chunks: list[_ListChunk] | None = None,
                         legacy_files: list[str] | None = None,
                         hierarchy: hierarchy_lib.Hierarchy | None = None,
                         pairs: Any = None):
    """A generator, or a Beam PTransform when the build runs on Beam."""
    if self.builder_config.kind == "synthetic":
      return self._generate_synthetic(split, num_examples)
    close = self.builder_config.label_closure == "closed"
    if legacy_files is not None:
      units = legacy_files
      expand = functools.partial(_read_legacy_file, hierarchy=hierarchy,
                                 pairs=pairs, close=close)
    else:
      units = chunks
      expand = functools.partial(_parse_chunk, hierarchy=hierarchy, pairs=pairs,
                                 close=close)
    if self._use_beam:
      return (beam.Create(units)
              | "Expand" >> beam.FlatMap(expand)
              | "Redistribute" >> beam.Reshuffle()
              | "Finish" >> beam.FlatMap(_finish_in_beam, split=split))
    return self._generate_locally(
        split, (item for unit in units for item in expand(unit)))

  def _generate_locally(self, split: str, items: Iterable[_Pending]
                        ) -> Iterator[tuple[str, dict]]:
    counts, examples = collections.Counter(), []
    yield from _finish_locally(items, counts, examples)
    self._record_skipped(split, counts, examples)

  def _generate_synthetic(self, split: str, num_examples: int
                          ) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    hierarchy = synthetic.synthetic_hierarchy()
    for ex in synthetic.generate_split(
        hierarchy, split, num_examples, image_size=config.image_size,
        seed=config.seed, close=config.label_closure == "closed"):
      yield ex.key, {"image": ex.jpeg, "file_name": f"{ex.key}.jpg",
                     "source": "synthetic", "labels": ex.labels,
                     "confidences": ex.confidences}

  def _record_skipped(self, split: str, counts: dict[str, int],
                      examples: list[str]) -> None:
    """Reports a split's skips, keeps them in the metadata, enforces the cap."""
    self._skipped[split] = {_MISSING: counts.get(_MISSING, 0),
                            _UNDECODABLE: counts.get(_UNDECODABLE, 0)}
    self.info.metadata["skipped"] = dict(self._skipped)
    _check_counts(split, counts, self.builder_config.max_bad_fraction,
                  examples)

  def _process_pipeline_result(self, pipeline_result) -> None:
    """Reads the Beam counters: the same report and cap as a local build."""
    if self.builder_config.kind == "synthetic":
      return
    query = pipeline_result.metrics().query(
        beam.metrics.MetricsFilter().with_namespace(_COUNTER_NAMESPACE))
    counts = collections.defaultdict(collections.Counter)
    for result in query["counters"]:
      split, status = result.key.metric.name.split("/")
      value = (result.committed if result.committed is not None
               else result.attempted)
      counts[split][status] += value
    for split in SPLITS:
      self._record_skipped(split, counts[split], [])
