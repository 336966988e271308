"""From a TFDS dataset to per-device batches: sharded, shuffled, resumable.

Design (why the iterator state is four integers and still exact):

* Sharding. Each JAX process reads `tfds.split_for_jax_process(split)`: the
  split cut into `process_count` contiguous, disjoint ranges whose sizes differ
  by at most one. TFDS turns a range into file instructions (shard file, skip,
  take); we read those TFRecord shards directly.
* Order of an epoch is a pure function of (seed, process, epoch). The host's
  shard files are permuted with a stateless RNG keyed by the epoch, then read
  in groups of `cycle_length` files: the files of a group are interleaved
  example by example and shuffled with a buffer whose seed is keyed by
  (epoch, group). Groups never mix, so the order within a group depends on
  nothing outside it. TFDS already shuffles examples across shard files when it
  builds a dataset, so a group of shards is a random sample of the split.
* State = (epoch, position in the host's epoch stream, examples yielded,
  batches yielded). Restoring skips the whole groups before `position` from the
  shard lengths (no I/O) and replays at most one group of serialized records
  (reading bytes, no decoding); its cost does not grow with the dataset or the
  number of hosts, unlike replaying a shuffle buffer from the epoch start or
  saving the buffer itself (gigabytes).
* Random access (array_record builds, read through TFDS's data source). The
  order of an epoch is one permutation of the whole split,
  `tf.random.experimental.index_shuffle` keyed by (seed, epoch) alone, so
  every host computes the same one without materialising it; process p takes
  its positions [n p / count, n (p + 1) / count): each epoch, each host gets
  a fresh random part of the split (a true global shuffle), the parts
  disjoint and together complete. Records are fetched by index in chunks and
  parsed and preprocessed by the same graph as TFRecords, so the same example
  at the same (epoch, position) gives the same pixels. The state is the same
  four integers, and restoring replays nothing: the permutation starts at
  `position`. Evaluation reads `split_for_jax_process(split)` in order, as the
  TFRecord path does.
* Per-example randomness (crop, flip, rotation, colour) is seeded by
  (seed, process, epoch, position), so a restored iterator also reproduces the
  augmentation.
* Colour distortion runs on the accelerator by default
  (`colour_on_device`): training batches then carry `colour`, each example's
  drawn parameters, and the training step applies them with
  `preprocessing.device_augment`. With `colour_on_device=False` the host
  applies them and the batch has no `colour` key (nor with `colour_fraction`
  0, nor in evaluation): its presence is the signal to augment on the device.
* Each example carries its (epoch, position) through the pipeline; the
  iterator reads them off every batch it yields, so the state is the position
  of what the trainer received, whatever tf.data has prefetched, and images
  that fail to decode (dropped by `ignore_errors`) are counted as the gap
  between positions consumed and examples yielded.

Training streams repeat forever (epochs follow each other, batches may span
them) and drop nothing but decode failures; evaluation reads every example of
the split exactly once, padded to a number of batches equal on every host,
with `mask` 0 on the padding.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mlimages_jax.inputs import preprocessing

_STATE_FORMAT = "mlimages-jax-input-state"
# What a state saved before a key joined the identity had.
_IDENTITY_DEFAULTS = {"file_format": "tfrecord"}
_MAX_EPOCHS = 2**62
# Sub-streams of an epoch's key, so that file order, group shuffles,
# augmentation and the global order draw independent randomness.
_FILE_ORDER, _GROUP_SHUFFLE, _AUGMENT, _GLOBAL_ORDER = 0, 1, 2, 3
_FORMATS = (tfds.core.FileFormat.TFRECORD, tfds.core.FileFormat.ARRAY_RECORD)


class DatasetNotBuiltError(FileNotFoundError):
  """The TFDS dataset (or split) is not in `data_dir`; says how to build it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a checkpoint needs to know about the classes of a dataset."""
  name: str
  num_classes: int
  class_ids: tuple[str, ...]
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  label_mode: str
  # "closed" / "as_given" (closure.LABEL_CLOSURES) as the builder recorded
  # it; None where the dataset does not say (imagenet2012, older builds).
  label_closure: str | None = None


def _dataset_family(dataset: str) -> str:
  return dataset.split("/")[0].split(":")[0]


def _config_name(dataset: str) -> str | None:
  parts = dataset.split(":")[0].split("/")
  return parts[1] if len(parts) > 1 else None


def _build_command(dataset: str, data_dir: str | None) -> str:
  """The exact `tfds build` command that creates `dataset` in `data_dir`."""
  family, config = _dataset_family(dataset), _config_name(dataset)
  if family == "ml_images":
    # The --imports form works from any install, checkout or not.
    cmd = "tfds build ml_images --imports=mlimages_jax.datasets.ml_images"
    if config:
      cmd += f" --config={config}"
    if config != "synthetic":
      cmd += (" --manual_dir=<folder written by `mlimages download` and "
              "`mlimages imagenet21k extract`>")
  elif family == "imagenet2012":
    cmd = ("tfds build imagenet2012 --manual_dir=<folder with "
           "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar>")
  else:
    cmd = f"tfds build {dataset.split(':')[0]}"
  if data_dir:
    cmd += f" --data_dir={data_dir}"
  return cmd


def _is_synthetic(dataset: str) -> bool:
  return (_dataset_family(dataset) == "ml_images" and
          _config_name(dataset) == "synthetic")


def load_builder(dataset: str, data_dir: str | None, *,
                 build_if_missing: bool = False) -> tfds.core.DatasetBuilder:
  """A prepared TFDS builder; builds `ml_images/synthetic` if asked to."""
  if _dataset_family(dataset) == "ml_images":
    import mlimages_jax.datasets.ml_images  # noqa: F401  (registers it)
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotBuiltError(
        f"unknown TFDS dataset {dataset!r} ({e}); build it with: "
        f"{_build_command(dataset, data_dir)}") from None
  if not builder.is_prepared():
    if build_if_missing and _is_synthetic(dataset):
      builder.download_and_prepare()
    else:
      raise DatasetNotBuiltError(
          f"dataset {dataset} is not built in {builder.data_dir}; build it "
          f"with: {_build_command(dataset, data_dir)}")
  return builder


def _single_label_target(builder: tfds.core.DatasetBuilder):
  """(class ids, class names, example -> int32 class) for single-label runs.

  Classification datasets (imagenet2012) have a `label`; `ml_images/synthetic`
  maps its labels to one of `synthetic.NUM_SINGLE_LABEL_CLASSES` shapes with
  `min(single_label_table()[positive labels])` (see mlimages_jax.data.synthetic).
  """
  features = builder.info.features
  if "label" in features:
    names = tuple(features["label"].names)
    return names, names, lambda ex: tf.cast(ex["label"], tf.int32)
  if builder.info.full_name.startswith("ml_images/synthetic"):
    from mlimages_jax.data import synthetic
    table = synthetic.single_label_table()
    wnids, _ = _multi_label_classes(builder)
    ids = tuple(wnids[int(np.flatnonzero(table == k)[0])]
                for k in range(synthetic.NUM_SINGLE_LABEL_CLASSES))
    table_tf = tf.constant(table)

    def target(ex):
      positive = tf.boolean_mask(ex["labels"], ex["confidences"] > 0)
      return tf.reduce_min(tf.gather(table_tf, positive))

    return ids, synthetic.SINGLE_LABEL_NAMES, target
  raise ValueError(f"dataset {builder.info.full_name} has no single-label "
                   "target (no `label` feature)")


def _multi_label_classes(builder: tfds.core.DatasetBuilder
                         ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  metadata = builder.info.metadata or {}
  if "wnids" in metadata:
    return tuple(metadata["wnids"]), tuple(metadata["names"])
  names = tuple(builder.info.features["labels"].feature.names)
  return names, names


def _info(builder: tfds.core.DatasetBuilder, label_mode: str) -> DatasetInfo:
  splits = {name: split.num_examples
            for name, split in builder.info.splits.items()}
  if label_mode == "multi":
    if "labels" not in builder.info.features:
      raise ValueError(f"dataset {builder.info.full_name} has no multi-label "
                       "`labels`/`confidences` features; use label_mode="
                       "'single'")
    ids, names = _multi_label_classes(builder)
  elif label_mode == "single":
    ids, names, _ = _single_label_target(builder)
  else:
    raise ValueError(f"label_mode must be 'multi' or 'single', not "
                     f"{label_mode!r}")
  return DatasetInfo(name=builder.info.full_name, num_classes=len(ids),
                     class_ids=ids, class_names=names, split_sizes=splits,
                     label_mode=label_mode,
                     label_closure=(builder.info.metadata or {}).get(
                         "label_closure"))


def dataset_info(dataset: str, data_dir: str | None, *,
                 label_mode: str = "multi") -> DatasetInfo:
  """Classes and split sizes of a built dataset, for checkpoint metadata."""
  return _info(load_builder(dataset, data_dir), label_mode)


def _split_error(builder: tfds.core.DatasetBuilder, split: str,
                 error: Exception) -> DatasetNotBuiltError:
  return DatasetNotBuiltError(
      f"split {split!r} not found in {builder.info.full_name} (splits: "
      f"{sorted(builder.info.splits)}): {error}")


def _file_instructions(builder: tfds.core.DatasetBuilder, split: str,
                       process_index: int, process_count: int):
  """This process's disjoint part of `split` as TFRecord file instructions."""
  try:
    sub = builder.info.splits[tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)]
    instructions = [fi for fi in sub.file_instructions if fi.take > 0]
  except (KeyError, ValueError, AssertionError) as e:
    raise _split_error(builder, split, e) from None
  return instructions


@dataclasses.dataclass(frozen=True)
class _Indexed:
  """The host's part of an array_record split, read by index.

  `source` holds the serialized examples of the split that the order
  permutes (training: all of it; evaluation: the host's part); the host
  reads its positions [offset, offset + size) of that order.
  """
  source: Sequence[bytes]
  offset: int
  size: int


def _indexed(builder: tfds.core.DatasetBuilder, split: str, *, training: bool,
             process_index: int, process_count: int) -> _Indexed:
  """This process's part of `split` of an array_record build."""
  host_split = split if training else tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)
  try:
    source = builder.as_data_source(
        host_split,
        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except (KeyError, ValueError, AssertionError) as e:
    raise _split_error(builder, split, e) from None
  if not training:
    return _Indexed(source, 0, len(source))
  offset = len(source) * process_index // process_count
  end = len(source) * (process_index + 1) // process_count
  return _Indexed(source, offset, end - offset)


def _fold(key: tf.Tensor, data) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(
      key, tf.cast(data, tf.int64))


def _augment_seed(key: tf.Tensor, epoch, position) -> tf.Tensor:
  """The seed of all that is random about the example at (epoch, position)
  of the stream of the host `key` ([seed, process]), whatever the format."""
  return _fold(_fold(_fold(key, epoch), _AUGMENT), position)


@dataclasses.dataclass(frozen=True)
class _Shard:
  """The host's shard files as tensors, in split order."""
  files: tf.Tensor
  skips: tf.Tensor
  takes: tf.Tensor


def _epoch_records(shard: _Shard, key: tf.Tensor, epoch: tf.Tensor,
                   start: tf.Tensor, *, shuffle: bool, cycle_length: int,
                   shuffle_buffer_size: int) -> tf.data.Dataset:
  """(epoch, position, serialized example) of one epoch from `start` on."""
  epoch_key = _fold(key, epoch)
  num_files = tf.size(shard.files, out_type=tf.int64)
  if shuffle:
    order = tf.argsort(tf.random.stateless_uniform(
        [num_files], _fold(epoch_key, _FILE_ORDER)))
  else:
    order = tf.range(num_files)
  files, skips, takes = (tf.gather(t, order) for t in
                         (shard.files, shard.skips, shard.takes))
  num_groups = (num_files + cycle_length - 1) // cycle_length
  group_sizes = tf.math.unsorted_segment_sum(
      takes, tf.range(num_files) // cycle_length, num_groups)
  group_ends = tf.cumsum(group_sizes)
  first_group = tf.searchsorted(group_ends, start[None], side="right")[0]
  first_group = tf.cast(first_group, tf.int64)
  group_start = tf.reduce_sum(group_sizes[:first_group])

  @tf.autograph.experimental.do_not_convert  # See `make_dataset`.
  def read_group(group):
    lo = group * cycle_length
    hi = tf.minimum(lo + cycle_length, num_files)
    ds = tf.data.Dataset.from_tensor_slices(
        (files[lo:hi], skips[lo:hi], takes[lo:hi]))
    ds = ds.interleave(
        lambda f, s, t: tf.data.TFRecordDataset(f).skip(s).take(t),
        cycle_length=cycle_length, block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle:
      seed = tf.random.stateless_uniform(
          [], _fold(_fold(epoch_key, _GROUP_SHUFFLE), group),
          minval=None, maxval=None, dtype=tf.int64)
      ds = ds.shuffle(shuffle_buffer_size, seed=seed)
    return ds.skip(tf.where(group == first_group, start - group_start, 0))

  records = tf.data.Dataset.range(first_group, num_groups).flat_map(read_group)
  positions = tf.data.Dataset.range(start, tf.int64.max)
  return tf.data.Dataset.zip(positions, records).map(
      lambda position, record: (epoch, position, record))


def _read(source: Sequence[bytes], indices: tf.Tensor) -> tf.Tensor:
  """The records at `indices` (int64 [n]), fetched in one call."""
  def read(keys: np.ndarray) -> np.ndarray:
    return np.array(source.__getitems__(keys.tolist()), dtype=object)

  records = tf.numpy_function(read, [indices], tf.string, stateful=False)
  records.set_shape(indices.shape)
  return records


def _indexed_epoch_records(host: _Indexed, key: tf.Tensor, epoch: tf.Tensor,
                           start: tf.Tensor, *, shuffle: bool,
                           read_chunk: int) -> tf.data.Dataset:
  """(epoch, position, serialized example) of one epoch from `start` on.

  `key` must be the same on every host: it picks the epoch's permutation.
  """
  order_key = _fold(_fold(key, epoch), _GLOBAL_ORDER)
  max_index = tf.constant(len(host.source) - 1, tf.int64)

  @tf.autograph.experimental.do_not_convert  # See `make_dataset`.
  def read(positions):
    indices = positions + host.offset
    if shuffle:
      indices = tf.random.experimental.index_shuffle(indices, order_key,
                                                     max_index)
    return positions, _read(host.source, indices)

  return (tf.data.Dataset.range(start, host.size).batch(read_chunk)
          .map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .unbatch()
          .map(lambda position, record: (epoch, position, record)))


@dataclasses.dataclass(frozen=True)
class _State:
  epoch: int = 0
  position: int = 0
  examples: int = 0
  batches: int = 0

  @classmethod
  def from_bytes(cls, state: bytes) -> _State:
    values = json.loads(state)
    return cls(**{f.name: int(values[f.name]) for f in dataclasses.fields(cls)})

  def decode_failures(self, host_examples: int) -> int:
    """Positions consumed minus examples yielded: the images skipped."""
    return self.epoch * host_examples + self.position - self.examples


class InputIterator(Iterator[dict[str, np.ndarray]]):
  """Iterator of device-shaped NumPy batches with an exact, small state.

  Attributes:
    num_classes: width of the multi-label vectors (or number of classes).
    num_examples: examples in the split (all hosts).
    host_num_examples: examples in this process's shard.
    local_batch_size: examples per batch on this host.
    num_batches: batches of an evaluation pass (equal on every host), or None
      for the endless training stream.
  """

  def __init__(self, make_dataset: Callable[[_State], tf.data.Dataset], *,
               identity: dict[str, Any], num_classes: int, num_examples: int,
               host_num_examples: int, local_batch_size: int,
               num_batches: int | None):
    self._make_dataset = make_dataset
    self._identity = identity
    self._state = _State()
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None
    self.num_classes = num_classes
    self.num_examples = num_examples
    self.host_num_examples = host_num_examples
    self.local_batch_size = local_batch_size
    self.num_batches = num_batches

  @property
  def decode_failures(self) -> int:
    """Images skipped because they failed to decode, so far (this host)."""
    return self._state.decode_failures(self.host_num_examples)

  @property
  def examples_yielded(self) -> int:
    return self._state.examples

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._make_dataset(self._state).as_numpy_iterator()
    batch = next(self._iterator)
    epochs, positions = batch.pop("_epoch"), batch.pop("_position")
    real = positions >= 0
    if real.any():
      last = np.flatnonzero(real)[-1]
      self._state = _State(epoch=int(epochs[last]),
                           position=int(positions[last]) + 1,
                           examples=self._state.examples + int(real.sum()),
                           batches=self._state.batches + 1)
    else:
      self._state = dataclasses.replace(self._state,
                                        batches=self._state.batches + 1)
    return batch

  def get_state(self) -> bytes:
    """The position after the last yielded batch, as small JSON bytes."""
    return json.dumps({"format": _STATE_FORMAT, **self._identity,
                       **dataclasses.asdict(self._state)}).encode()

  def set_state(self, state: bytes) -> None:
    """Continues exactly after the batch at which `state` was taken."""
    values = json.loads(state)
    if values.get("format") != _STATE_FORMAT:
      raise ValueError("not an input-pipeline state")
    for key, expected in self._identity.items():
      saved = values.get(key, _IDENTITY_DEFAULTS.get(key))
      if saved != expected:
        raise ValueError(
            f"input-pipeline state was saved with {key}={saved!r} "
            f"but this pipeline has {key}={expected!r}; the batch sequence "
            "cannot be resumed exactly")
    self._state = _State.from_bytes(state)
    self._iterator = None


def create_input_iterator(
    *, dataset: str, data_dir: str | None, split: str, global_batch_size: int,
    image_size: int, mode: str, label_mode: str, seed: int,
    preprocess: Mapping[str, Any] | None = None,
    process_index: int | None = None, process_count: int | None = None,
    local_device_count: int | None = None, transfer_dtype: str = "uint8",
    build_if_missing: bool = False, cycle_length: int = 16,
    shuffle_buffer_size: int = 16_384, read_chunk: int = 64) -> InputIterator:
  """Batches of `split` for this process, shaped [devices, per_device, ...].

  `mode` "pretrain"/"finetune" gives the endless shuffled, augmented training
  stream (remainder dropped); "eval" one ordered pass with padding and `mask`.
  Images are uint8 (normalise on the device with `preprocessing.normalize`)
  unless `transfer_dtype="float32"`, which ships values in [-1, 1]. Training
  batches with colour on the device also carry `colour` float32
  [devices, per_device, preprocessing.COLOUR_PARAMS]: then the step calls
  `preprocessing.device_augment(image, colour)` instead of `normalize`.

  TFRecord builds are read as shard files (`cycle_length` interleaved,
  `shuffle_buffer_size`), array_record builds by index (`read_chunk` records
  per call of TFDS's data source), with a global shuffle per epoch; see the
  module docstring.
  """
  if transfer_dtype not in ("uint8", "float32"):
    raise ValueError(f"transfer_dtype must be 'uint8' or 'float32', not "
                     f"{transfer_dtype!r}")
  config = preprocessing.PreprocessConfig.for_mode(mode, preprocess)
  training = mode != "eval"
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = (jax.process_count() if process_count is None
                   else process_count)
  local_device_count = (jax.local_device_count() if local_device_count is None
                        else local_device_count)
  if global_batch_size % (process_count * local_device_count):
    raise ValueError(
        f"global_batch_size {global_batch_size} is not divisible by "
        f"{process_count} processes x {local_device_count} local devices")
  local_batch = global_batch_size // process_count
  per_device = local_batch // local_device_count

  builder = load_builder(dataset, data_dir, build_if_missing=build_if_missing)
  info = _info(builder, label_mode)
  # Builds from before TFDS recorded their format are TFRecords.
  file_format = builder.info.file_format or tfds.core.FileFormat.TFRECORD
  if file_format not in _FORMATS:
    raise ValueError(f"{builder.info.full_name} is stored as "
                     f"{file_format.value}; the input pipeline reads "
                     "tfrecord and array_record datasets")
  key = tf.constant([seed, process_index], tf.int64)
  epoch_records: Callable[[tf.Tensor, tf.Tensor], tf.data.Dataset]
  if file_format == tfds.core.FileFormat.ARRAY_RECORD:
    host = _indexed(builder, split, training=training,
                    process_index=process_index, process_count=process_count)
    host_examples = host.size
    # No process in the key: every host permutes the split the same way.
    epoch_records = functools.partial(
        _indexed_epoch_records, host, tf.constant([seed, -1], tf.int64),
        shuffle=training, read_chunk=read_chunk)
  else:
    instructions = _file_instructions(builder, split, process_index,
                                      process_count)
    host_examples = sum(fi.take for fi in instructions)
    shard = _Shard(
        files=tf.constant([fi.filename for fi in instructions]),
        skips=tf.constant([fi.skip for fi in instructions], tf.int64),
        takes=tf.constant([fi.take for fi in instructions], tf.int64))
    # Evaluation reads the files one after the other: TFDS's split order.
    epoch_records = functools.partial(
        _epoch_records, shard, key, shuffle=training,
        cycle_length=cycle_length if training else 1,
        shuffle_buffer_size=shuffle_buffer_size)
  if host_examples == 0:
    raise ValueError(f"process {process_index} of {process_count} gets no "
                     f"examples of {dataset} {split!r}")
  num_examples = builder.info.splits[split].num_examples
  features = builder.info.features
  decoders = {"image": tfds.decode.SkipDecoding()}
  num_classes = info.num_classes
  single_label = (_single_label_target(builder)[2] if label_mode == "single"
                  else None)
  colour_on_device = (training and config.colour_on_device and
                      config.colour_fraction > 0)

  @tf.autograph.experimental.do_not_convert  # See `make_dataset`.
  def parse(epoch, position, record):
    example = features.deserialize_example(record, decoders=decoders)
    extra = {}
    if training:
      aug_key = _augment_seed(key, epoch, position)
      image = preprocessing.train_image(example["image"], aug_key,
                                        image_size=image_size, config=config)
      if colour_on_device:
        extra["colour"] = preprocessing.colour_parameters(aug_key,
                                                          config=config)
    else:
      image = preprocessing.eval_image(example["image"], image_size=image_size,
                                       config=config)
    if single_label is not None:
      labels = single_label(example)
    else:
      labels = tf.tensor_scatter_nd_update(
          tf.zeros([num_classes], tf.float32),
          tf.cast(example["labels"], tf.int32)[:, None],
          tf.cast(example["confidences"], tf.float32))
    if transfer_dtype == "float32":
      image = preprocessing.normalize_tf(image)
    return {"image": image, "labels": labels, "mask": tf.constant(1.0),
            **extra, "_epoch": epoch, "_position": position}

  @tf.autograph.experimental.do_not_convert
  def to_devices(batch):
    return {k: (v if k.startswith("_") else
                tf.reshape(v, [local_device_count, per_device,
                               *v.shape[1:]]))
            for k, v in batch.items()}

  num_batches = None
  if not training:
    num_batches = math.ceil(math.ceil(num_examples / process_count)
                            / local_batch)

  # The map functions are plain TF ops (no Python control flow on tensors):
  # AutoGraph's source conversion of `parse` and everything it calls was 6.7
  # of the 12 s to a process's first batch (smoke config, cProfile), paid by
  # every training, evaluation and classification run.
  def make_dataset(state: _State) -> tf.data.Dataset:
    if training:
      start_epoch = tf.constant(state.epoch, tf.int64)
      start = tf.constant(state.position, tf.int64)
      ds = tf.data.Dataset.range(state.epoch, _MAX_EPOCHS).flat_map(
          tf.autograph.experimental.do_not_convert(
              lambda e: epoch_records(e, tf.where(
                  e == start_epoch, start, tf.constant(0, tf.int64)))))
    else:
      ds = epoch_records(tf.constant(0, tf.int64),
                         tf.constant(state.position, tf.int64))
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.ignore_errors(log_warning=True)
    if training:
      ds = ds.batch(local_batch, drop_remainder=True)
    else:
      filler = {k: tf.zeros(spec.shape, spec.dtype)
                for k, spec in ds.element_spec.items()}
      filler["_position"] = tf.constant(-1, tf.int64)  # Not an example.
      padding = tf.data.Dataset.from_tensors(filler).repeat()
      ds = ds.concatenate(padding).take(
          (num_batches - state.batches) * local_batch).batch(local_batch)
    ds = ds.map(to_devices).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options)

  identity = {"dataset": dataset, "split": split, "mode": mode, "seed": seed,
              "process_index": process_index, "process_count": process_count,
              "file_format": file_format.value}
  return InputIterator(
      make_dataset, identity=identity, num_classes=num_classes,
      num_examples=num_examples, host_num_examples=host_examples,
      local_batch_size=local_batch, num_batches=num_batches)


class DevicePrefetchIterator(Iterator[Any]):
  """Keeps `size` batches on the devices ahead of the training step.

  `get_state()` is the host iterator's state after the batch this iterator
  last returned (not after the batches it holds in its buffer), so a
  checkpoint taken between steps resumes exactly.
  """

  def __init__(self, iterator: InputIterator, size: int,
               devices: list[jax.Device] | None = None):
    self._iterator = iterator
    self._size = size
    devices = jax.local_devices() if devices is None else devices
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    self._sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("devices"))
    self._queue: collections.deque = collections.deque()
    self._state = iterator.get_state()

  def _fill(self) -> None:
    while len(self._queue) < self._size:
      try:
        batch = next(self._iterator)
      except StopIteration:
        return
      on_device = jax.tree.map(
          lambda x: jax.device_put(x, self._sharding), batch)
      self._queue.append((on_device, self._iterator.get_state()))

  def __next__(self) -> Any:
    self._fill()
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes) -> None:
    self._queue.clear()
    self._iterator.set_state(state)
    self._state = state

  @property
  def decode_failures(self) -> int:
    """Decode failures up to the last batch this iterator returned."""
    return _State.from_bytes(self._state).decode_failures(
        self._iterator.host_num_examples)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._iterator, name)


def prefetch_to_device(iterator: InputIterator, size: int = 2,
                       devices: list[jax.Device] | None = None
                       ) -> DevicePrefetchIterator:
  """Like flax's jax_utils.prefetch_to_device, keeping get_state/set_state."""
  return DevicePrefetchIterator(iterator, size, devices)
