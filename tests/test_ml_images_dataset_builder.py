"""Tests of the ml_images builder.

TFDS's own `DatasetBuilderTestCase` builds every config from `dummy_data/`;
the pytest tests below build real datasets from manual directories made in
temporary folders (generated images of every kind, broken ones included, and
the original project's photos and TFRecords when they are available).
"""

from __future__ import annotations

import io
import pathlib
import shutil
import subprocess
import sys

import apache_beam as beam
from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mlimages_jax import decoding
from mlimages_jax.data import annotations
from mlimages_jax.data import closure
from mlimages_jax.data import hierarchy as hierarchy_lib
from mlimages_jax.data import synthetic
from mlimages_jax.inputs import pipeline
from mlimages_jax.datasets.ml_images import create_dummy_data as dummy
from mlimages_jax.datasets.ml_images import ml_images_dataset_builder as mib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class FullTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = mib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["full"]
  SPLITS = {"train": 7, "validation": 4}


class ImagenetTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = mib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["imagenet"]
  SPLITS = {"train": 3, "validation": 2}


class OpenimagesTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = mib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["openimages"]
  SPLITS = {"train": 4, "validation": 2}


class LegacyTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = mib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["legacy"]
  SPLITS = {"train": 3, "validation": 2}


class SyntheticTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = mib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["synthetic"]
  SPLITS = synthetic.DEFAULT_SPLIT_SIZES


# ---- builds from generated manual directories ---------------------------------

# (file name, kind); kind None: listed but absent.
_TRAIN = [("a.jpg", "jpeg"), ("b.png", "png"), ("c.jpg", "gray"),
          ("d.jpg", "cmyk"), ("e.jpg", "corrupt"), ("f.jpg", None),
          ("g.jpg", "jpeg"), ("h.jpg", "jpeg")]
_VALIDATION = [("v0.jpg", "jpeg"), ("v1.png", "png")]


def _write_part(manual_dir: pathlib.Path, part: str,
                hierarchy: hierarchy_lib.Hierarchy,
                splits: dict[str, list[tuple[str, str | None]]],
                seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  for split, entries in splits.items():
    images = [(name, None if kind is None else dummy.image_bytes(kind, rng))
              for name, kind in entries]
    dummy.write_split(manual_dir / part / split, images,
                      [dummy.random_labels(rng, hierarchy.num_classes)
                       for _ in entries])


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("manual")
  hierarchy = dummy.dummy_hierarchy()
  dummy.write_manual_root(root, hierarchy)  # Co-occurrence pairs included.
  _write_part(root, "openimages", hierarchy,
              {"train": _TRAIN, "validation": _VALIDATION})
  return root


def _lenient(**kwargs) -> mib.MlImagesConfig:
  """openimages, tolerating the 2 bad images of 8 in `manual_dir`."""
  return mib.MlImagesConfig(name="openimages_lenient", parts=("openimages",),
                            max_bad_fraction=0.3, **kwargs)


# Beam's DirectRunner, 2 worker threads (what `tfds build
# --beam_pipeline_options=runner=DirectRunner,...` makes).
_DIRECT_RUNNER = beam.options.pipeline_options.PipelineOptions(
    ["--runner=DirectRunner", "--direct_num_workers=2",
     "--direct_running_mode=multi_threading"])


def _build(manual_dir, data_dir, config="openimages", *, file_format=None,
           beam_options=None) -> tfds.core.DatasetBuilder:
  kwargs = {"file_format": file_format} if file_format else {}
  builder = mib.Builder(config=config, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), beam_options=beam_options))
  return builder


def _examples(builder, split: str) -> dict[str, dict]:
  return {ex["file_name"].decode(): ex
          for ex in tfds.as_numpy(builder.as_dataset(split=split,
                                                     decoders=_RAW_IMAGE))}


_RAW_IMAGE = {"image": tfds.decode.SkipDecoding()}


def _expected_labels(list_path: pathlib.Path,
                     hierarchy: hierarchy_lib.Hierarchy,
                     pairs=None) -> dict[str, tuple]:
  rows = {}
  for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
    key, idx, conf = annotations.parse_line(line, source=str(list_path),
                                            lineno=lineno)
    rows[key] = closure.augment(hierarchy, idx, conf, pairs)
  return rows


def test_local_build_converts_keeps_and_skips(manual_dir, tmp_path):
  builder = _build(manual_dir, tmp_path, _lenient())
  images_dir = manual_dir / "openimages" / "train" / "images"
  train = _examples(builder, "train")
  assert sorted(train) == ["a.jpg", "b.png", "c.jpg", "d.jpg", "g.jpg",
                           "h.jpg"]
  hierarchy = dummy.dummy_hierarchy()
  list_path = manual_dir / "openimages/train/im_list.txt"
  expected = _expected_labels(list_path, hierarchy,
                              dummy.dummy_pairs(hierarchy))
  closure_only = _expected_labels(list_path, hierarchy)
  assert any(len(expected[k][0]) > len(closure_only[k][0]) for k in train)
  for name, ex in train.items():
    np.testing.assert_array_equal(ex["labels"], expected[name][0])
    np.testing.assert_array_equal(ex["confidences"], expected[name][1])
    assert ex["source"] == b"openimages"
    source = (images_dir / name).read_bytes()
    stored = ex["image"]
    with Image.open(io.BytesIO(stored)) as image:
      assert (image.format, image.mode) == ("JPEG", "RGB")
      decoded = np.asarray(image)
    if name in ("a.jpg", "g.jpg", "h.jpg"):  # RGB JPEG: byte-for-byte.
      assert stored == source
    else:  # Converted: same picture (PNG alpha composited on white).
      assert stored != source
      with Image.open(io.BytesIO(source)) as original:
        reference = np.asarray(mib._to_rgb(original), np.float64)
      assert decoded.shape == reference.shape
      assert np.abs(decoded - reference).mean() < 3
  assert builder.info.metadata["skipped"] == {
      "train": {"missing": 1, "undecodable": 1},
      "validation": {"missing": 0, "undecodable": 0}}
  assert builder.info.metadata["wnids"] == list(hierarchy.wnids)
  assert builder.info.metadata["parents"] == hierarchy.parents.tolist()
  assert builder.info.features["labels"].feature.names == list(hierarchy.wnids)
  # A reader needs nothing but the data dir: hierarchy and names come back.
  reloaded = tfds.builder_from_directory(builder.data_dir)
  assert reloaded.info.metadata["label_closure"] == "closed"
  assert reloaded.info.metadata["names"] == list(hierarchy.names)
  assert reloaded.info.features["labels"].feature.names == list(
      hierarchy.wnids)
  assert reloaded.info.splits["train"].num_examples == 6


def test_as_given_keeps_the_listed_labels_and_says_so(manual_dir, tmp_path):
  """`label_closure="as_given"`: each line's labels exactly (sorted, a
  repeated class at its highest confidence), no ancestors, no co-occurrence
  pairs; the choice is in the metadata the training loop reads."""
  builder = _build(manual_dir, tmp_path, _lenient(label_closure="as_given"))
  list_path = manual_dir / "openimages/train/im_list.txt"
  hierarchy = dummy.dummy_hierarchy()
  closed = _expected_labels(list_path, hierarchy)
  train = _examples(builder, "train")
  grew = 0
  for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
    name, indices, confidences = annotations.parse_line(
        line, source=str(list_path), lineno=lineno)
    if name not in train:  # Skipped: missing or undecodable image.
      continue
    listed = {}
    for i, c in zip(indices.tolist(), confidences.tolist()):
      listed[i] = max(c, listed.get(i, -np.inf))
    ex = train[name]
    assert ex["labels"].tolist() == sorted(listed)
    np.testing.assert_array_equal(ex["confidences"],
                                  np.float32([listed[i] for i in
                                              sorted(listed)]))
    grew += len(closed[name][0]) > len(listed)
  assert grew  # Closure would have added ancestors.
  assert builder.info.metadata["label_closure"] == "as_given"
  # What the training loop reads (by name, from the data dir).
  info = pipeline.dataset_info("ml_images/openimages_lenient", str(tmp_path))
  assert info.label_closure == "as_given"


def test_too_many_bad_images_fails_and_leaves_nothing(manual_dir, tmp_path):
  with pytest.raises(mib.TooManyBadImagesError,
                     match=r"train: 6 of 8 .* 2 skipped \(1 missing, 1 "
                     r"undecodable\).*exceeds max_bad_fraction=0.05"):
    _build(manual_dir, tmp_path)
  # TFDS's temporary directory is gone: nothing of the split was kept.
  assert not list((tmp_path / "ml_images" / "openimages").rglob("*"))
  assert not mib.Builder(config="openimages",
                         data_dir=str(tmp_path)).is_prepared()


def test_missing_split_names_expected_paths(tmp_path):
  root = tmp_path / "manual"
  hierarchy = dummy.dummy_hierarchy()
  hierarchy.write(root / mib.HIERARCHY_FILE)
  _write_part(root, "openimages", hierarchy, {"train": _VALIDATION})
  with pytest.raises(mib.MissingManualFilesError) as e:
    _build(root, tmp_path / "data", "full")
  message = str(e.value)
  for path in ("openimages/validation/im_list.txt",
               "openimages/validation/images", "imagenet/train/im_list.txt",
               "imagenet/validation/images"):
    assert str(root / path) in message
  assert "openimages/train/im_list.txt" not in message


def test_missing_hierarchy_is_reported(tmp_path):
  root = tmp_path / "manual"
  _write_part(root, "openimages", dummy.dummy_hierarchy(),
              {"train": _VALIDATION})
  with pytest.raises(mib.MissingManualFilesError,
                     match=str(root / mib.HIERARCHY_FILE)):
    _build(root, tmp_path / "data")


def test_out_of_range_class_names_file_and_line(manual_dir, tmp_path):
  root = tmp_path / "manual"
  shutil.copytree(manual_dir, root)
  list_path = root / "openimages" / "validation" / "im_list.txt"
  list_path.write_text(list_path.read_text() + "v2.jpg\t3:1\t10:0.9\n")
  with pytest.raises(annotations.LabelError,
                     match=rf"^{list_path}:3: class index 10 out of range"):
    _build(root, tmp_path / "data", _lenient())


def test_broken_hierarchy_names_file_and_line(manual_dir, tmp_path):
  root = tmp_path / "manual"
  shutil.copytree(manual_dir, root)
  path = root / mib.HIERARCHY_FILE
  lines = path.read_text().splitlines()
  lines[3] = "2\td0000002\t42\tbank"  # Parent 42 does not exist.
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(hierarchy_lib.HierarchyError,
                     match=rf"^{path}:4: parent index 42"):
    _build(root, tmp_path / "data", _lenient())


def test_beam_build_equals_local_build_in_both_formats(manual_dir, tmp_path):
  local = _build(manual_dir, tmp_path / "local", _lenient())
  on_beam = _build(manual_dir, tmp_path / "beam",
                   _lenient(lines_per_work_unit=3), file_format="array_record",
                   beam_options=_DIRECT_RUNNER)
  assert on_beam.info.file_format.value == "array_record"
  assert list(on_beam.data_path.glob("*.array_record*"))
  assert on_beam.info.metadata["skipped"] == local.info.metadata["skipped"]
  for split in ("train", "validation"):
    expected = _examples(local, split)
    source = on_beam.as_data_source(split=split)
    assert len(source) == len(expected)
    for ex in source:  # Random-access reader of array_record files.
      want = expected[ex["file_name"].decode()]
      np.testing.assert_array_equal(ex["labels"], want["labels"])
      np.testing.assert_array_equal(ex["confidences"], want["confidences"])
      with Image.open(io.BytesIO(want["image"])) as image:  # Same decoder.
        np.testing.assert_array_equal(ex["image"], np.asarray(image))


def test_beam_build_enforces_bad_fraction(manual_dir, tmp_path):
  with pytest.raises(mib.TooManyBadImagesError, match="train: 6 of 8"):
    _build(manual_dir, tmp_path, beam_options=_DIRECT_RUNNER)


def test_to_rgb_jpeg_rejects_garbage():
  with pytest.raises(mib.UndecodableImageError):
    mib.to_rgb_jpeg(b"not an image at all")
  jpeg = dummy.image_bytes("jpeg", np.random.default_rng(0))
  assert mib.to_rgb_jpeg(jpeg) is jpeg
  with pytest.raises(mib.UndecodableImageError, match="(?i)truncated"):
    mib.to_rgb_jpeg(jpeg[:len(jpeg) // 2])


def test_to_rgb_jpeg_applies_the_decode_policy(monkeypatch):
  """Too many pixels (a lowered limit) is refused from the header; 16-bit
  greyscale is scaled by >> 8 (it came out almost white: PIL clips)."""
  deep = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
  buffer = io.BytesIO()
  Image.fromarray(deep).save(buffer, "PNG")
  stored = mib.to_rgb_jpeg(buffer.getvalue())
  grey = np.asarray(Image.open(io.BytesIO(stored)).convert("L"), np.int64)
  assert np.abs(grey - (deep >> 8)).max() <= 3  # JPEG error, not 255 - x.
  monkeypatch.setattr(decoding, "MAX_PIXELS", 64 * 63)
  with pytest.raises(mib.UndecodableImageError, match="too many pixels: "
                     "64x64 = 4,096 > 4,032"):
    mib.to_rgb_jpeg(buffer.getvalue())


def test_lists_and_hierarchy_with_bom_crlf_and_bad_bytes(tmp_path):
  """A BOM made the first file name "\\ufeffa.jpg" (missing) and broke the
  hierarchy's header; bad bytes were a traceback without file or line."""
  hierarchy = dummy.dummy_hierarchy()
  path = tmp_path / mib.HIERARCHY_FILE
  hierarchy.write(path)
  path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n",
                                                             b"\r\n"))
  builder = mib.Builder(config="openimages", data_dir=str(tmp_path / "data"))
  assert builder._read_hierarchy(epath.Path(tmp_path)).wnids == (
      hierarchy.wnids)
  listing = tmp_path / "im_list.txt"
  listing.write_bytes(b"\xef\xbb\xbfa.jpg 1:0.5\r\nb.jpg 2\r\n")

  def file_names():
    chunks = mib._line_chunks("openimages", listing, tmp_path, 1)
    return [p.file_name for c in chunks
            for p in mib._parse_chunk(c, hierarchy, None, close=False)]

  assert file_names() == ["a.jpg", "b.jpg"]
  listing.write_bytes(b"a.jpg 1\nb\xff.jpg 2\n")
  with pytest.raises(annotations.LabelError,
                     match=rf"^{listing}:2: not UTF-8: byte 0xff"):
    file_names()


def test_bad_custom_configs_are_rejected():
  with pytest.raises(ValueError, match="kind must be one of"):
    mib.MlImagesConfig(name="x", kind="bogus")
  with pytest.raises(ValueError, match="parts must be a non-empty subset"):
    mib.MlImagesConfig(name="x", parts=["flickr"])
  with pytest.raises(ValueError, match="max_bad_fraction must be in"):
    mib.MlImagesConfig(name="x", max_bad_fraction=5)
  with pytest.raises(ValueError, match="label_closure must be one of"):
    mib.MlImagesConfig(name="x", label_closure="open")


# ---- the original project's files ---------------------------------------------


def test_real_photos_are_stored_byte_for_byte(shared_dir, real_hierarchy_path,
                                              tmp_path):
  root = tmp_path / "manual"
  photos = sorted((shared_dir / "images").glob("*.jpg"))
  assert len(photos) == 4
  train = root / "openimages" / "train"
  (train / "images").mkdir(parents=True)
  lines = []
  for i, photo in enumerate(photos):
    shutil.copy(photo, train / "images" / photo.name)
    lines.append(f"{photo.name}\t{1000 + i}:0.9\t{5000 + i}\n")
  (train / "im_list.txt").write_text("".join(lines))
  hierarchy = hierarchy_lib.Hierarchy.from_file(real_hierarchy_path)
  shutil.copy(real_hierarchy_path, root / mib.HIERARCHY_FILE)
  _write_part(root, "openimages", hierarchy, {"validation": _VALIDATION})
  builder = _build(root, tmp_path / "data")
  examples = _examples(builder, "train")
  assert sorted(examples) == [p.name for p in photos]
  for i, photo in enumerate(photos):
    ex = examples[photo.name]
    assert ex["image"] == photo.read_bytes()
    want = closure.augment(hierarchy, np.int32([1000 + i, 5000 + i]),
                           np.float32([0.9, 1.0]))
    np.testing.assert_array_equal(ex["labels"], want[0])
    np.testing.assert_array_equal(ex["confidences"], want[1])
  assert len(builder.info.metadata["wnids"]) == 11166


def test_legacy_closes_or_keeps_the_original_label_vectors(
    shared_dir, real_hierarchy_path, tmp_path):
  """The original's TFRecords hold its unclosed list labels: `legacy`
  closes them like every config, `as_given` keeps them exactly."""
  root = tmp_path / "manual"
  records = sorted((shared_dir / "tfrecords").glob("*.tfrecords"))
  for split, record in zip(("train", "validation"), records):
    (root / "tfrecords" / split).mkdir(parents=True)
    shutil.copy(record, root / "tfrecords" / split / record.name)
  shutil.copy(real_hierarchy_path, root / mib.HIERARCHY_FILE)
  hierarchy = hierarchy_lib.Hierarchy.from_file(real_hierarchy_path)
  closed = _build(root, tmp_path / "closed", "legacy")
  as_given = _build(root, tmp_path / "as_given", mib.MlImagesConfig(
      name="legacy_as_given", kind="legacy", parts=(),
      label_closure="as_given"))
  grew = 0
  for split, record in zip(("train", "validation"), records):
    originals = [tf.train.Example.FromString(r.numpy()).features.feature
                 for r in tf.data.TFRecordDataset(str(record))]
    built = [{ex["file_name"].decode(): ex for ex in tfds.as_numpy(
        builder.as_dataset(split=split, decoders=_RAW_IMAGE))}
             for builder in (closed, as_given)]
    assert len(originals) == len(built[0]) == len(built[1]) == 2
    for original in originals:
      name = original["name"].bytes_list.value[0].decode()
      dense = np.frombuffer(original["label"].bytes_list.value[0], "<f4")
      ex = built[1][name]
      rebuilt = np.zeros(11166, np.float32)
      rebuilt[ex["labels"]] = ex["confidences"]
      np.testing.assert_array_equal(rebuilt, dense)
      assert ex["source"] == b"legacy"
      assert ex["image"] == original["image"].bytes_list.value[0]
      indices = np.flatnonzero(dense)
      want = closure.augment(hierarchy, indices, dense[indices])
      np.testing.assert_array_equal(built[0][name]["labels"], want[0])
      np.testing.assert_array_equal(built[0][name]["confidences"], want[1])
      grew += len(want[0]) > len(indices)
  assert grew
  assert closed.info.metadata["label_closure"] == "closed"
  assert as_given.info.metadata["label_closure"] == "as_given"


# ---- the documented commands ---------------------------------------------------


@pytest.mark.slow
def test_tfds_build_commands(tmp_path):
  """The `tfds build` commands of the README, as a user runs them."""
  tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
  data_dir = tmp_path / "data"
  as_given = ('--config={"name": "openimages_as_given", "parts": '
              '["openimages"], "label_closure": "as_given"}')
  for args in (["--config=synthetic"],
               ["--config=openimages", f"--manual_dir={dummy.DUMMY_DATA}"],
               [as_given, f"--manual_dir={dummy.DUMMY_DATA}"]):
    subprocess.run([str(tfds_cli), "build", "tfds_builder/ml_images",
                    *args, f"--data_dir={data_dir}"], cwd=REPO_ROOT,
                    check=True, capture_output=True)
  import mlimages_jax.datasets.ml_images  # noqa: F401  (registers ml_images)
  built = tfds.builder("ml_images/synthetic", data_dir=str(data_dir))
  assert built.info.splits["train"].num_examples == 3000
  first = next(iter(tfds.as_numpy(built.as_dataset(split="validation"))))
  assert first["image"].shape == (64, 64, 3)
  built = tfds.builder("ml_images/openimages", data_dir=str(data_dir))
  assert built.info.splits["train"].num_examples == 4
  assert built.info.metadata["label_closure"] == "closed"
  kept = tfds.builder("ml_images/openimages_as_given", data_dir=str(data_dir))
  assert kept.info.metadata["label_closure"] == "as_given"
  sizes = [sum(len(ex["labels"]) for ex in tfds.as_numpy(
      builder.as_dataset(split="train"))) for builder in (built, kept)]
  assert sizes[0] > sizes[1]  # Closure added ancestors.
