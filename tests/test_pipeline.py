"""Tests of mlimages_jax.inputs.pipeline on small TFDS datasets built here.

`TinyMlImages` has the `ml_images` features (image, file_name, source,
labels, confidences, hierarchy metadata) and encodes each example's index in
its labels, so every batch says which examples it holds. Its `clean` config
is built twice: as TFRecords (`data_dir`) and as array_record
(`array_record_dir`).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mlimages_jax.inputs import pipeline
from mlimages_jax.inputs import preprocessing

NUM_CLASSES = 64
ID_CLASSES = 48  # Class i (< 48) positive at 1.0 marks example i.
SPLITS = {"train": 45, "validation": 13}
CORRUPT = (4, 17, 30)  # Examples of the `corrupt` config with broken bytes.
WNIDS = [f"n{i:08d}" for i in range(NUM_CLASSES)]


def example_labels(index: int) -> tuple[list[int], list[float]]:
  """Example `index`: its id class at 1.0 and a shared class at 0.5 or -1."""
  return ([index, ID_CLASSES + index % 8],
          [1.0, -1.0 if index % 2 else 0.5])


def dense_reference(index: int) -> np.ndarray:
  dense = np.zeros(NUM_CLASSES, np.float32)
  labels, confidences = example_labels(index)
  dense[labels] = confidences
  return dense


def _jpeg(index: int, rng: np.random.Generator) -> bytes:
  h, w = rng.integers(24, 48, size=2)
  pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


class TinyMlImages(tfds.core.GeneratorBasedBuilder):
  """The ml_images features at toy size; `corrupt` has undecodable images."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="clean"),
                     tfds.core.BuilderConfig(name="corrupt")]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "file_name": tfds.features.Text(),
            "source": tfds.features.Text(),
            "labels": tfds.features.Sequence(
                tfds.features.ClassLabel(names=WNIDS)),
            "confidences": tfds.features.Sequence(np.float32),
        }),
        metadata=tfds.core.MetadataDict(
            wnids=WNIDS, names=[f"class {i}" for i in range(NUM_CLASSES)],
            parents=[-1] * NUM_CLASSES))

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(name, size)
            for name, size in SPLITS.items()}

  def _generate_examples(self, split, size):
    rng = np.random.default_rng(len(split))
    for index in range(size):
      image = _jpeg(index, rng)
      if (self.builder_config.name == "corrupt" and split == "train"
          and index in CORRUPT):
        image = b"\xff\xd8 this is not a JPEG" if index % 2 else image[:200]
      labels, confidences = example_labels(index)
      yield f"{split}_{index}", {
          "image": image, "file_name": f"{index}.jpg", "source": "synthetic",
          "labels": labels, "confidences": confidences}


class TinyClassification(tfds.core.GeneratorBasedBuilder):
  """An imagenet2012-like single-label dataset (`label`)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=["a", "b", "c", "d", "e"]),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for index in range(12):
      yield index, {"image": _jpeg(index, rng), "label": index % 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("tfds")
  config = tfds.download.DownloadConfig(num_shards=4)
  for name in ("clean", "corrupt"):
    TinyMlImages(config=name, data_dir=path).download_and_prepare(
        download_config=config)
  TinyClassification(data_dir=path).download_and_prepare()
  return str(path)


@pytest.fixture(scope="module")
def array_record_dir(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("tfds_array_record")
  TinyMlImages(config="clean", data_dir=path,
               file_format="array_record").download_and_prepare(
                   download_config=tfds.download.DownloadConfig(num_shards=4))
  return str(path)


@pytest.fixture(scope="module")
def builds(data_dir, array_record_dir) -> dict[str, str]:
  """The data_dir of tiny_ml_images/clean in each file format."""
  return {"tfrecord": data_dir, "array_record": array_record_dir}


def make(data_dir, **overrides) -> pipeline.InputIterator:
  kwargs = dict(dataset="tiny_ml_images/clean", data_dir=data_dir,
                split="train", global_batch_size=8, image_size=16,
                mode="pretrain", label_mode="multi", seed=0, process_index=0,
                process_count=1, local_device_count=2, shuffle_buffer_size=64)
  kwargs.update(overrides)
  return pipeline.create_input_iterator(**kwargs)


def ids(batch) -> np.ndarray:
  """Example indices of the real (mask 1) rows of a batch, in order."""
  labels = batch["labels"].reshape(-1, NUM_CLASSES)
  real = batch["mask"].reshape(-1) > 0
  assert np.all((labels[real, :ID_CLASSES] == 1.0).sum(axis=1) == 1)
  return np.argmax(labels[real, :ID_CLASSES] == 1.0, axis=1)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def assert_same_batches(expected, actual) -> None:
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_train_batch_shapes_dtypes_and_dense_labels(data_dir):
  iterator = make(data_dir)
  assert iterator.num_classes == NUM_CLASSES
  assert iterator.num_examples == SPLITS["train"]
  orders = []
  for batch in take(iterator, 7):  # 56 > 45: crosses an epoch boundary.
    assert set(batch) == {"image", "labels", "mask", "colour"}
    assert batch["image"].shape == (2, 4, 16, 16, 3)
    # Colour runs on the device: per-example parameters, neutral if not drawn.
    assert batch["colour"].shape == (2, 4, preprocessing.COLOUR_PARAMS)
    assert batch["colour"].dtype == np.float32
    colour = batch["colour"].reshape(8, -1)
    orders.extend(colour[:, 0])
    np.testing.assert_array_equal(colour[colour[:, 0] == 0],
                                  np.tile(preprocessing.NEUTRAL_COLOUR, (
                                      (colour[:, 0] == 0).sum(), 1)))
    assert batch["image"].dtype == np.uint8
    assert batch["labels"].shape == (2, 4, NUM_CLASSES)
    assert batch["labels"].dtype == np.float32
    np.testing.assert_array_equal(batch["mask"], np.ones((2, 4), np.float32))
    expected = np.stack([dense_reference(i) for i in ids(batch)])
    np.testing.assert_array_equal(batch["labels"].reshape(8, -1), expected)
  assert iterator.decode_failures == 0
  assert set(orders) == {0.0, 1.0, 2.0}


def test_colour_on_host_option_matches_colour_on_device(data_dir):
  on_device = take(make(data_dir, seed=2), 3)
  on_host = take(make(data_dir, seed=2,
                      preprocess={"colour_on_device": False}), 3)
  no_colour = take(make(data_dir, seed=2,
                        preprocess={"colour_fraction": 0.0}), 1)
  assert "colour" not in on_host[0] and "colour" not in no_colour[0]
  for device, host in zip(on_device, on_host):
    np.testing.assert_array_equal(device["labels"], host["labels"])
    augmented = preprocessing.device_augment(device["image"],
                                             device["colour"])
    diff = np.abs(augmented - preprocessing.normalize(host["image"])) * 127.5
    assert diff.max() <= 3.0 and diff.mean() < 0.6
    # Undistorted examples ship the same pixels either way.
    plain = device["colour"][..., 0] == 0
    np.testing.assert_array_equal(device["image"][plain], host["image"][plain])


def test_float32_transfer_is_the_normalized_uint8_stream(data_dir):
  as_uint8 = take(make(data_dir), 2)
  as_float = take(make(data_dir, transfer_dtype="float32"), 2)
  for small, big in zip(as_uint8, as_float):
    assert big["image"].dtype == np.float32
    np.testing.assert_array_equal(
        big["image"], np.asarray(preprocessing.normalize(small["image"])))
    np.testing.assert_array_equal(big["colour"], small["colour"])
    assert -1.0 <= big["image"].min() and big["image"].max() <= 1.0


def test_same_seed_same_batches_other_seed_other_order(data_dir):
  first = take(make(data_dir, seed=3), 6)
  second = take(make(data_dir, seed=3), 6)
  other = take(make(data_dir, seed=4), 6)
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not all(np.array_equal(ids(a), ids(c)) for a, c in zip(first, other))


def test_epochs_are_shuffled_permutations_of_the_shard(data_dir):
  iterator = make(data_dir, global_batch_size=1, local_device_count=1)
  stream = np.concatenate([ids(b) for b in take(iterator, 3 * 45)])
  epochs = stream.reshape(3, 45)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(45))
  assert not np.array_equal(epochs[0], np.arange(45))
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("process_count", [2, 3])
def test_train_shards_are_disjoint_and_complete(data_dir, process_count):
  shards = []
  for index in range(process_count):
    iterator = make(data_dir, global_batch_size=process_count,
                    local_device_count=1, process_index=index,
                    process_count=process_count)
    size = iterator.host_num_examples
    shards.append(np.concatenate([ids(b) for b in take(iterator, size)]))
    assert len(set(shards[-1])) == size  # One epoch: each example once.
  union = np.concatenate(shards)
  np.testing.assert_array_equal(np.sort(union), np.arange(45))
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_reads_every_example_once_with_padding(data_dir, process_count):
  seen, batch_counts = [], []
  for index in range(process_count):
    iterator = make(data_dir, split="validation", mode="eval",
                    global_batch_size=2 * process_count,
                    process_index=index, process_count=process_count)
    batches = list(iterator)
    batch_counts.append(len(batches))
    assert len(batches) == iterator.num_batches
    for batch in batches:
      assert set(batch) == {"image", "labels", "mask"}
      assert batch["image"].shape == (2, 1, 16, 16, 3)
      padding = batch["mask"] == 0
      assert np.all(batch["image"][padding] == 0)
      assert np.all(batch["labels"][padding] == 0)
    seen.append(np.concatenate([ids(b) for b in batches]))
  # Every host runs the same number of steps (collectives stay in lockstep).
  assert len(set(batch_counts)) == 1
  union = np.concatenate(seen)
  np.testing.assert_array_equal(np.sort(union), np.arange(13))
  # In TFDS's split order (as_dataset without file shuffling).
  builder = tfds.builder("tiny_ml_images/clean", data_dir=data_dir)
  split_order = [int(ex["labels"][0]) for ex in tfds.as_numpy(
      builder.as_dataset(split="validation", shuffle_files=False))]
  np.testing.assert_array_equal(union, split_order)


def test_eval_pixels_equal_eval_preprocessing(data_dir):
  batch = next(make(data_dir, split="validation", mode="eval",
                    global_batch_size=2, local_device_count=1))
  builder = tfds.builder("tiny_ml_images/clean", data_dir=data_dir)
  ds = builder.as_dataset(split="validation[:2]", shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  config = preprocessing.PreprocessConfig.for_mode("eval")
  for i, example in enumerate(ds):
    expected = preprocessing.eval_image(example["image"], image_size=16,
                                        config=config)
    np.testing.assert_array_equal(batch["image"][0, i], expected.numpy())


def assert_restores_exactly(data_dir: str, stop: int, **kwargs) -> None:
  """Restored after `stop` batches of 4, the stream goes on as if never cut."""
  kwargs = dict(seed=5, global_batch_size=4, **kwargs)
  uninterrupted = take(make(data_dir, **kwargs), 14)
  interrupted = make(data_dir, **kwargs)
  take(interrupted, stop)
  state = interrupted.get_state()
  assert len(state) < 512
  restored = make(data_dir, **kwargs)
  restored.set_state(state)
  assert_same_batches(uninterrupted[stop:], take(restored, 14 - stop))


# cycle_length 2 reads the 4 shard files of an epoch as 2 groups, so a
# restore also skips whole groups; stop 11 restores 1 example before the end
# of epoch 0 (44 of 45), stop 12 in epoch 1.
@pytest.mark.parametrize("stop,cycle_length", [(2, 16), (6, 2), (11, 2),
                                               (12, 2)])
def test_restored_iterator_continues_exactly(data_dir, stop, cycle_length):
  assert_restores_exactly(data_dir, stop, cycle_length=cycle_length)


def test_array_record_restores_exactly_mid_epoch(array_record_dir):
  """Stop 11 is position 44 of epoch 0, mid-chunk (chunks of 5): the
  restored stream finishes the chunk and the epoch and goes on to epoch 1."""
  assert_restores_exactly(array_record_dir, 11, read_chunk=5)


def test_array_record_eval_batches_equal_tfrecord_batches(builds):
  """The same examples in the same order, bit for bit, on every host."""
  process_count = 3
  for index in range(process_count):
    kwargs = dict(split="validation", mode="eval",
                  global_batch_size=2 * process_count, process_index=index,
                  process_count=process_count)
    assert_same_batches(list(make(builds["tfrecord"], **kwargs)),
                        list(make(builds["array_record"], **kwargs)))


def examples_preprocessed(data_dir: str, stream_ids: np.ndarray, *,
                          seed: int, image_size: int) -> dict[str, np.ndarray]:
  """Rows of one host's training stream computed one by one: example
  `stream_ids[i]` of the TFRecord build at (epoch, position) = divmod(i, 45),
  preprocessed with that position's seed."""
  records = tfds.builder("tiny_ml_images/clean", data_dir=data_dir).as_dataset(
      split="train", decoders={"image": tfds.decode.SkipDecoding()})
  images = {int(ex["labels"][0]): ex["image"] for ex in records}
  config = preprocessing.PreprocessConfig.for_mode("pretrain")
  key = tf.constant([seed, 0], tf.int64)
  rows = {"image": [], "colour": []}
  for i, index in enumerate(stream_ids):
    example_seed = pipeline._augment_seed(key, *divmod(i, SPLITS["train"]))
    rows["image"].append(preprocessing.train_image(
        images[index], example_seed, image_size=image_size, config=config))
    rows["colour"].append(preprocessing.colour_parameters(example_seed,
                                                          config=config))
  return {"labels": np.stack([dense_reference(i) for i in stream_ids]),
          **{k: np.stack(v) for k, v in rows.items()}}


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_training_rows_are_the_same_function_of_example_and_position(
    builds, file_format):
  """Either format, a training row is the tfrecord bytes of its example
  preprocessed with the seed of its (epoch, position): bit-identical batches
  for the same examples. 48 rows cross into epoch 1."""
  batches = take(make(builds[file_format], seed=7, global_batch_size=16,
                      local_device_count=1), 3)
  stream = np.concatenate([ids(b) for b in batches])
  expected = examples_preprocessed(builds["tfrecord"], stream, seed=7,
                                   image_size=16)
  for key, want in expected.items():
    got = np.concatenate([b[key].reshape(16, *b[key].shape[2:])
                          for b in batches])
    np.testing.assert_array_equal(got, want)


def test_array_record_epochs_are_one_global_permutation_split_by_host(
    array_record_dir):
  """Each epoch is a permutation of the split by (seed, epoch) alone:
  process p of 3 reads its third of it, so hosts are disjoint and complete
  every epoch and each gets other examples each epoch (a global shuffle)."""
  def epochs(process_index, process_count, num_epochs=2):
    iterator = make(array_record_dir, global_batch_size=process_count,
                    local_device_count=1, process_index=process_index,
                    process_count=process_count)
    size = iterator.host_num_examples
    return np.concatenate([ids(b) for b in take(
        iterator, num_epochs * size)]).reshape(num_epochs, size)

  single = epochs(0, 1)
  hosts = [epochs(p, 3) for p in range(3)]
  assert [h.shape[1] for h in hosts] == [15, 15, 15]
  for epoch, order in enumerate(single):
    np.testing.assert_array_equal(np.sort(order), np.arange(45))
    np.testing.assert_array_equal(
        np.concatenate([h[epoch] for h in hosts]), order)
  assert not np.array_equal(single[0], single[1])
  assert not np.array_equal(single[0], np.arange(45))
  assert set(hosts[0][0]) != set(hosts[0][1])


def test_state_of_a_different_pipeline_is_rejected(builds):
  state = make(builds["tfrecord"], seed=1).get_state()
  with pytest.raises(ValueError, match="seed"):
    make(builds["tfrecord"], seed=2).set_state(state)
  # Another order: a tfrecord position is not an array_record one.
  with pytest.raises(ValueError, match="file_format='tfrecord'"):
    make(builds["array_record"], seed=1).set_state(state)
  # States saved before array_record support still restore (tfrecord).
  old = json.loads(state)
  del old["file_format"]
  make(builds["tfrecord"], seed=1).set_state(json.dumps(old).encode())
  with pytest.raises(ValueError, match="file_format='tfrecord'"):
    make(builds["array_record"], seed=1).set_state(json.dumps(old).encode())


def test_eval_resumes_mid_pass(data_dir):
  kwargs = dict(split="validation", mode="eval", global_batch_size=4)
  full = list(make(data_dir, **kwargs))
  partial = make(data_dir, **kwargs)
  take(partial, 2)
  restored = make(data_dir, **kwargs)
  restored.set_state(partial.get_state())
  rest = list(restored)
  assert len(rest) == len(full) - 2
  for expected, actual in zip(full[2:], rest):
    np.testing.assert_array_equal(expected["image"], actual["image"])
    np.testing.assert_array_equal(expected["mask"], actual["mask"])


def test_prefetch_to_device_state_follows_what_was_returned(data_dir):
  devices = jax.local_devices()[:2]
  uninterrupted = take(make(data_dir, seed=9), 6)
  prefetched = pipeline.prefetch_to_device(make(data_dir, seed=9), 3,
                                                 devices)
  received = take(prefetched, 3)
  for expected, batch in zip(uninterrupted, received):
    assert isinstance(batch["image"], jax.Array)
    assert batch["image"].sharding.device_set == set(devices)
    np.testing.assert_array_equal(np.asarray(batch["image"]),
                                  expected["image"])
  restored = make(data_dir, seed=9)
  restored.set_state(prefetched.get_state())
  for expected, actual in zip(uninterrupted[3:], take(restored, 3)):
    np.testing.assert_array_equal(expected["labels"], actual["labels"])


def test_undecodable_images_are_skipped_and_counted(data_dir):
  iterator = make(data_dir, dataset="tiny_ml_images/corrupt",
                  global_batch_size=1, local_device_count=1)
  good = 45 - len(CORRUPT)
  stream = np.concatenate([ids(b) for b in take(iterator, 2 * good)])
  for epoch in stream.reshape(2, good):
    np.testing.assert_array_equal(
        np.sort(epoch), np.setdiff1d(np.arange(45), CORRUPT))
  assert iterator.decode_failures == 2 * len(CORRUPT)
  # The count survives a restore.
  restored = make(data_dir, dataset="tiny_ml_images/corrupt",
                  global_batch_size=1, local_device_count=1)
  restored.set_state(iterator.get_state())
  assert restored.decode_failures == 2 * len(CORRUPT)


def test_single_label_classification_dataset(data_dir):
  iterator = make(data_dir, dataset="tiny_classification", label_mode="single",
                  mode="finetune", global_batch_size=4)
  batch = next(iterator)
  assert iterator.num_classes == 5
  assert batch["labels"].shape == (2, 2) and batch["labels"].dtype == np.int32
  assert set(np.unique(batch["labels"])) <= set(range(5))
  info = pipeline.dataset_info("tiny_classification", data_dir,
                                     label_mode="single")
  assert info.class_ids == ("a", "b", "c", "d", "e")
  with pytest.raises(ValueError, match="label_mode"):
    make(data_dir, dataset="tiny_classification", label_mode="multi")


def test_dataset_info_reads_the_hierarchy_metadata(data_dir):
  info = pipeline.dataset_info("tiny_ml_images/clean", data_dir)
  assert info.num_classes == NUM_CLASSES
  assert info.class_ids == tuple(WNIDS)
  assert info.class_names[3] == "class 3"
  assert info.split_sizes == SPLITS
  assert info.label_mode == "multi"


def test_missing_dataset_and_split_say_how_to_build(data_dir, tmp_path):
  with pytest.raises(pipeline.DatasetNotBuiltError,
                     match=f"tfds build imagenet2012 .*--data_dir={tmp_path}"):
    make(str(tmp_path), dataset="imagenet2012", label_mode="single")
  with pytest.raises(pipeline.DatasetNotBuiltError,
                     match="tfds build tiny_ml_images/clean"):
    make(str(tmp_path))
  with pytest.raises(pipeline.DatasetNotBuiltError, match="'test'"):
    make(data_dir, split="test")


def test_batch_size_must_split_over_processes_and_devices(data_dir):
  with pytest.raises(ValueError, match="not divisible"):
    make(data_dir, global_batch_size=6, process_count=2, local_device_count=2)


def test_state_is_small_json(data_dir):
  iterator = make(data_dir)
  take(iterator, 3)
  state = json.loads(iterator.get_state())
  assert state["position"] == 24 and state["epoch"] == 0
  assert state["examples"] == 24 and state["batches"] == 3


def test_ml_images_synthetic_built_on_demand(tmp_path):
  from mlimages_jax.data import synthetic
  kwargs = dict(dataset="ml_images/synthetic", data_dir=str(tmp_path),
                split="validation", mode="eval", global_batch_size=100,
                local_device_count=4)
  with pytest.raises(pipeline.DatasetNotBuiltError,
                     match="tfds build ml_images --imports=mlimages_jax"
                           r"\.datasets\.ml_images --config=synthetic "
                           f"--data_dir={tmp_path}"):
    make(**kwargs)
  multi = make(**kwargs, build_if_missing=True)
  single = make(**kwargs, label_mode="single")
  assert multi.num_classes == 45 and single.num_classes == 6
  dense, classes = [], []
  for m, s in zip(multi, single):
    keep = m["mask"].reshape(-1) > 0
    dense.append(m["labels"].reshape(-1, 45)[keep])
    classes.append(s["labels"].reshape(-1)[keep])
  dense, classes = np.concatenate(dense), np.concatenate(classes)
  # The same examples as the generator's (in TFDS's order): compare as sets.
  examples = list(synthetic.generate_split(
      synthetic.synthetic_hierarchy(), "validation", 500))
  expected = np.zeros((500, 45), np.float32)
  for i, ex in enumerate(examples):
    expected[i, ex.labels] = ex.confidences
  assert sorted(map(bytes, dense)) == sorted(map(bytes, expected))
  # Both passes read the split in the same order: row by row, the single
  # label is C's mapping of the multi-label row.
  np.testing.assert_array_equal(
      classes, [synthetic.single_label(np.flatnonzero(row > 0))
                for row in dense])


@pytest.mark.parametrize("module", ["mlimages_jax.inputs.pipeline",
                                    "mlimages_jax.inference.predict"])
def test_tf_data_users_hide_gpus_from_tensorflow(module):
  """Importing a tf.data user hides GPUs from TensorFlow before any op runs.

  With no GPU here the visible list is checked, not GPU memory: TF starts
  with an empty list (= every device visible) and `set_visible_devices([],
  "GPU")` replaces it by the devices that are not GPUs.
  """
  code = ("import tensorflow as tf\n"
          "from tensorflow.python.eager import context\n"
          "ctx = context.context()\n"
          "assert ctx._visible_device_list == [], ctx._visible_device_list\n"
          f"import {module}\n"
          "print(sorted({d.device_type for d in ctx._visible_device_list}))\n"
          "print(tf.config.get_visible_devices('GPU'))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.split("\n")
  assert out[:2] == ["['CPU']", "[]"]
