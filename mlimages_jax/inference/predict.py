"""Using a trained model: classify images and extract features (ML_IMAGES.md §9).

`LoadedModel` turns any checkpoint (a training workdir, a step, or an
inference checkpoint such as a converted TF one) into a pmapped forward pass
over the local devices; evaluation reuses it. Two preprocessings:

- "original" (the default of both commands): the original's inference
  clients, `image_classification.py` and `extract_feature.py`, exactly
  (`inputs.client_preprocessing`: OpenCV decoding with EXIF orientation,
  shorter side 256, 224 crops), read by a pool of threads.
- "eval" (`classify` only): the §7 evaluation crop (central 80 %, bilinear
  resize to the checkpoint's image size) by the same tf.data functions as
  evaluation, so a photo is seen exactly as `mlimages evaluate` sees it.

`classify` gives the top-k classes with index, id (wnid or ImageNet-1k id),
name and probability (softmax for single-label checkpoints, as the original's
classifier; sigmoid for multi-label ones). `extract_features` gives the pooled
feature vector of the centre crop (the original's extractor) or the mean over
the 10 crops.

Files that cannot be read or decoded are skipped and reported with their
reason; both preprocessings first apply the project's decode policy
(`decoding`: pixel limit from the header, truncated or corrupt files refused,
a pixel budget for the decoding threads). Results keep the order of the input. `extract_features_to_file`
saves long runs chunk by chunk so that a killed run resumes. The writers also
produce the original's files (`label_pred.txt` blocks, feature lines).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from etils import epath
from tqdm import tqdm

from mlimages_jax.checkpoints import store
from mlimages_jax import decoding
from mlimages_jax import fileio
from mlimages_jax.inputs import client_preprocessing
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet

CROPS = ("center", "10crop")
PREPROCESSINGS = ("original", "eval")
FEATURE_FORMATS = ("npy", "original")


class LoadedModel:
  """A checkpoint's network, replicated on the local devices, and its metadata.

  The variables are checked against the network the metadata describes
  before anything runs, so a checkpoint whose metadata and weights disagree
  (depth, width, classes) fails with the list of differences instead of a
  shape error inside XLA.
  """

  def __init__(self, variables: Mapping[str, Any], metadata: Mapping[str, Any],
               *, source: str = "checkpoint"):
    self.metadata = dict(metadata)
    self.source = source
    spec = self.metadata["model"]
    self.model = resnet.create_model(
        int(spec["depth"]), int(spec["num_classes"]),
        width_multiplier=float(spec["width_multiplier"]))
    check_variables(self.model, variables, source)
    self.devices = jax.local_devices()
    # pmap over the default devices: on several hosts every process feeds its
    # local devices, as in a data-parallel training step.
    self._variables = flax.jax_utils.replicate(
        jax.tree.map(np.asarray, dict(variables)))
    self._forward = pmapped_forward(self.model)

  @classmethod
  def load(cls, checkpoint: str | os.PathLike[str]) -> LoadedModel:
    """Loads any checkpoint kind; unreadable ones raise CheckpointError."""
    variables, metadata = store.load_for_inference(checkpoint)
    return cls(variables, metadata, source=str(fileio.as_path(checkpoint)))

  @property
  def num_classes(self) -> int:
    return int(self.metadata["model"]["num_classes"])

  @property
  def image_size(self) -> int:
    return int(self.metadata["image_size"])

  @property
  def label_mode(self) -> str:
    return self.metadata["label_mode"]

  @property
  def class_ids(self) -> list[str]:
    return self.metadata["classes"]["ids"]

  @property
  def class_names(self) -> list[str]:
    return self.metadata["classes"]["names"]

  def forward_sharded(self, images: np.ndarray
                      ) -> tuple[jax.Array, jax.Array]:
    """uint8 [devices, per_device, H, W, 3] -> (logits, features), sharded."""
    return self._forward(self._variables, images)

  def forward(self, images: np.ndarray, pad_to: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] -> NumPy (logits [N, C], features [N, F]).

    The batch is zero-padded to `pad_to` rows (rounded up to the device
    count) so that every call of a run has one shape and compiles once.
    """
    n = len(images)
    d = len(self.devices)
    rows = -(-max(n, pad_to or 0) // d) * d
    padded = np.zeros((rows, *images.shape[1:]), images.dtype)
    padded[:n] = images
    logits, features = self.forward_sharded(
        padded.reshape(d, rows // d, *images.shape[1:]))
    return (np.asarray(logits).reshape(rows, -1)[:n],
            np.asarray(features).reshape(rows, -1)[:n])

  def probabilities(self, logits: np.ndarray) -> np.ndarray:
    """Sigmoid scores for multi-label models, softmax for single-label ones."""
    logits = np.asarray(logits, np.float64)
    if self.label_mode == "single":
      shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
      return shifted / shifted.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


@functools.lru_cache(maxsize=4)
def pmapped_forward(model: resnet.ResNet,
                    devices: tuple[jax.Device, ...] | None = None
                    ) -> Callable:
  """One compiled forward pass per network: a training run that evaluates
  every N steps builds a `LoadedModel` each time and compiles only once.
  `devices`: the local ones by default, another platform's for compiling
  ahead (train/compile_ahead.py)."""
  return jax.pmap(lambda variables, images: model.apply(
      variables, preprocessing.normalize(images), train=False),
      devices=devices)


def check_variables(model: resnet.ResNet, variables: Mapping[str, Any],
                     source: str) -> None:
  """Raises CheckpointError listing every missing/unexpected/misshaped array."""
  expected = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))
  want = {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(k): np.shape(v)
          for k, v in jax.tree_util.tree_leaves_with_path(dict(variables))}
  problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - have)]
  problems += [f"unexpected {k} {have[k]}" for k in sorted(have.keys() - want)]
  problems += [f"{k}: checkpoint {have[k]}, model {want[k]}"
               for k in sorted(want.keys() & have) if want[k] != have[k]]
  if problems:
    raise store.CheckpointError(
        f"{source}: the weights do not fit the network its metadata describes "
        f"(ResNet stages {tuple(model.stage_sizes)}, width "
        f"{model.width_multiplier}, {model.num_classes} classes): "
        f"{len(problems)} problem(s): " + "; ".join(problems[:10])
        + (" ..." if len(problems) > 10 else ""))


# ---------------------------------------------------------------------------
# Reading images.


def read_image_list(path: str | os.PathLike[str],
                    root: str | os.PathLike[str] | None = None) -> list[str]:
  """Paths from a list file (one per line; blank lines and `#` comments skipped).

  A line's path ends at its first TAB, as the original classifier reads
  `im_list_for_classification.txt`. Relative entries are resolved against
  `root` (default: the current directory).
  """
  return [path for path, _ in _list_entries(path, root, "\t")]


def read_labelled_image_list(path: str | os.PathLike[str],
                             root: str | os.PathLike[str] | None = None
                             ) -> tuple[list[str], list[str]]:
  """(paths, labels) from a list in the original feature extractor's form.

  `extract_feature.py` splits each line at single spaces: the path, then the
  label it copies into its output. A line without a label gets "" (the
  original would stop with an IndexError).
  """
  entries = _list_entries(path, root, " ")
  return [p for p, _ in entries], [label for _, label in entries]


def _list_entries(path: str | os.PathLike[str],
                  root: str | os.PathLike[str] | None, separator: str
                  ) -> list[tuple[str, str]]:
  entries = []
  with fileio.open_text(path) as f:
    for line in f:
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      fields = line.rstrip("\r\n").split(separator)
      entry = fields[0].strip()
      entries.append((entry if root is None or os.path.isabs(entry)
                      else os.path.join(root, entry),
                      fields[1].strip() if len(fields) > 1 else ""))
  return entries


@dataclasses.dataclass(frozen=True)
class Failure:
  """An input that was skipped (its position in the input), and why."""
  index: int
  path: str
  reason: str


def _unreadable(path: str) -> str | None:
  if not os.path.exists(path):
    return "no such file"
  if not os.path.isfile(path):
    return "not a file"
  if not os.access(path, os.R_OK):
    return "permission denied"
  return None


def _check_image(path: str) -> decoding.ImageHeader | str:
  """The file's header, or why `decoding` refuses it."""
  try:
    return decoding.check_image(path)
  except decoding.ImageRejected as e:
    return e.reason


Loader = Callable[[list[int], int, list[Failure]],
                  Iterator[tuple[np.ndarray, np.ndarray]]]


def _batches(paths: Sequence[str], loader: Loader, batch_size: int,
             progress: bool, failures: list[Failure]
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (input indices, uint8 [b, crops, H, W, 3]) in input order.

  Unreadable files never reach `loader`; it appends the files it cannot
  decode. `failures` ends sorted by input position.
  """
  readable = []
  for i, path in enumerate(paths):
    reason = _unreadable(path)
    if reason:
      failures.append(Failure(i, path, reason))
    else:
      readable.append(i)
  bar = tqdm(total=len(paths), unit="img", disable=not progress)
  bar.update(len(paths) - len(readable))
  if readable:
    for indices, images in loader(readable, batch_size, failures):
      bar.update(len(indices))
      yield indices, images
  bar.update(len(paths) - bar.n)
  bar.close()
  failures.sort(key=lambda f: f.index)


def _client_loader(paths: Sequence[str], ten_crop: bool) -> Loader:
  """The original clients' preprocessing, files decoded by a thread pool.

  OpenCV releases the GIL while decoding and resizing; at most two batches
  are in flight, so memory stays bounded on long lists.
  """
  def load(readable: list[int], batch_size: int, failures: list[Failure]
           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    queue = iter(readable)
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:

      def submit() -> None:
        i = next(queue, None)
        if i is not None:
          pending.append((i, pool.submit(client_preprocessing.load_crops,
                                         paths[i], ten_crop=ten_crop)))

      for _ in range(2 * batch_size):
        submit()
      indices, crops = [], []
      while pending:
        i, job = pending.popleft()
        submit()
        try:
          crops.append(job.result())
          indices.append(i)
        except client_preprocessing.ImageError as e:
          failures.append(Failure(i, paths[i], e.reason))
        if indices and (len(indices) == batch_size or not pending):
          yield np.array(indices), np.stack(crops)
          indices, crops = [], []
  return load


def _tf_loader(paths: Sequence[str],
               preprocess: Callable[[tf.Tensor], tf.Tensor]) -> Loader:
  """A tf.data pipeline (parallel decode) with the evaluation functions.

  Files go through `decoding.check_image` first (in a thread pool): those
  it refuses are failures with its reason. At most `decoding.PIXEL_BUDGET`
  pixels' worth of the largest image are decoded at once. Files that still
  fail to decode are dropped by `ignore_errors` and found as the indices
  missing between the ones that come out.
  """
  def load(readable: list[int], batch_size: int, failures: list[Failure]
           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    checked, largest = [], 1
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      for i, result in zip(readable, pool.map(
          _check_image, [paths[i] for i in readable])):
        if isinstance(result, str):
          failures.append(Failure(i, paths[i], result))
        else:
          checked.append(i)
          largest = max(largest, result.pixels)
    if not checked:
      return
    readable = checked
    ds = tf.data.Dataset.from_tensor_slices(
        (np.array(readable, np.int64), [paths[i] for i in readable]))
    # Plain TF ops: no AutoGraph conversion (seconds at every start).
    ds = ds.map(tf.autograph.experimental.do_not_convert(
        lambda i, p: (i, preprocess(tf.io.read_file(p)))),
        num_parallel_calls=max(1, min(os.cpu_count() or 1,
                                      decoding.PIXEL_BUDGET // largest)),
        deterministic=True)
    ds = ds.ignore_errors().batch(batch_size).prefetch(2)
    expected = [*readable, len(paths)]  # Sentinel: everything left is missing.
    pos = 0
    for indices, images in ds.as_numpy_iterator():
      for i in indices:
        while expected[pos] < i:
          failures.append(Failure(expected[pos], paths[expected[pos]],
                                  "not a decodable image"))
          pos += 1
        pos += 1
      yield indices, images
    while expected[pos] < len(paths):
      failures.append(Failure(expected[pos], paths[expected[pos]],
                              "not a decodable image"))
      pos += 1
  return load


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The top-k classes of one image: (index, id, name, probability) each."""
  path: str
  classes: tuple[tuple[int, str, str, float], ...]


def classify(model: LoadedModel, paths: Sequence[str], *, top_k: int = 5,
             batch_size: int = 32, preprocess: str = "original",
             progress: bool = True
             ) -> tuple[list[Prediction], list[Failure]]:
  """Top-k classes of each readable image.

  `preprocess` "original": the original classifier's centre 224 crop of the
  image resized to shorter side 256 (whatever the checkpoint's image size,
  as the original); "eval": the §7 evaluation crop at the checkpoint's size.
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  if preprocess not in PREPROCESSINGS:
    raise ValueError(f"preprocess must be one of {PREPROCESSINGS}, not "
                     f"{preprocess!r}")
  top_k = min(top_k, model.num_classes)
  if preprocess == "original":
    loader = _client_loader(paths, ten_crop=False)
  else:
    config = preprocessing.PreprocessConfig.for_mode("eval")
    loader = _tf_loader(paths, lambda data: preprocessing.eval_image(
        data, image_size=model.image_size, config=config)[None])

  predictions, failures = [], []
  for indices, images in _batches(paths, loader, batch_size, progress,
                                  failures):
    logits, _ = model.forward(images[:, 0], pad_to=batch_size)
    probs = model.probabilities(logits)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    for i, row, top in zip(indices, probs, order):
      predictions.append(Prediction(paths[i], tuple(
          (int(c), model.class_ids[c], model.class_names[c], float(row[c]))
          for c in top)))
  return predictions, failures


def extract_features(model: LoadedModel, paths: Sequence[str], *,
                     crop: str = "center", batch_size: int = 32,
                     progress: bool = True
                     ) -> tuple[np.ndarray, list[str], list[Failure]]:
  """Pooled features float32 [n_ok, F] of the readable images, input order.

  The original extractor's preprocessing: `crop` "center" is its centre 224
  crop of the image resized to shorter side 256 (what it runs); "10crop"
  averages the features of its 10 crops (4 corners, centre, and the same of
  the mirrored image; the original's own 10-crop branch cannot run, see
  README). Returns (features, their paths, failures).
  """
  if crop not in CROPS:
    raise ValueError(f"crop must be one of {CROPS}, not {crop!r}")
  loader = _client_loader(paths, ten_crop=crop == "10crop")
  chunks, kept, failures = [], [], []
  for indices, crops in _batches(paths, loader, batch_size, progress,
                                 failures):
    n, num_crops = crops.shape[:2]
    _, features = model.forward(crops.reshape(n * num_crops, *crops.shape[2:]),
                                pad_to=batch_size * num_crops)
    chunks.append(features.reshape(n, num_crops, -1).mean(axis=1))
    kept.extend(paths[i] for i in indices)
  width = resnet.scaled_features(2048, model.model.width_multiplier)
  features = (np.concatenate(chunks).astype(np.float32) if chunks
              else np.zeros((0, width), np.float32))
  return features, kept, failures


# ---------------------------------------------------------------------------
# Writing results (atomically, local or remote: see fileio).

PREDICTIONS_HEADER = "image\trank\tindex\tid\tname\tprobability"


def write_predictions(path: str | os.PathLike[str],
                      predictions: Sequence[Prediction]) -> None:
  """TSV, one line per (image, rank), with a header line."""
  with fileio.atomic_writer(path, encoding="utf-8") as f:
    f.write(PREDICTIONS_HEADER + "\n")
    for p in predictions:
      for rank, (index, class_id, name, prob) in enumerate(p.classes, 1):
        f.write(f"{p.path}\t{rank}\t{index}\t{class_id}\t{name}\t{prob:.6f}\n")


def label_pred_lines(predictions: Sequence[Prediction],
                     failures: Sequence[Failure] = ()) -> list[str]:
  """The original classifier's `label_pred.txt`, in input order.

  A block per image: `+++ the predictions of PATH is:` then `INDEX NAME:
  PROB` per class with PROB at 3 decimals. NAME is the class name's first
  word: the original's dictionary reader keeps the first TAB field of
  `imagenet2012_dictionary.txt`, whose words are TAB-separated. A file it
  cannot open gets the original's `open pic PATH failed` line.
  """
  blocks = [(f.index, [f"open pic {f.path} failed"]) for f in failures]
  # Every input is a prediction (in input order) or a failure (with its
  # position), so the predictions take the positions the failures leave.
  failed = {f.index for f in failures}
  positions = (i for i in itertools.count() if i not in failed)
  for p, i in zip(predictions, positions):
    blocks.append((i, [f"+++ the predictions of {p.path} is:"] + [
        f"{index} {(name.split() or [''])[0]}: {prob:.3f}"
        for index, _, name, prob in p.classes]))
  return [line for _, lines in sorted(blocks) for line in lines]


def write_label_pred(path: str | os.PathLike[str],
                     predictions: Sequence[Prediction],
                     failures: Sequence[Failure] = ()) -> None:
  """`label_pred_lines` to `path`, as the original's `--result` file."""
  with fileio.atomic_writer(path, encoding="utf-8") as f:
    f.writelines(line + "\n" for line in label_pred_lines(predictions,
                                                          failures))


def write_feature_lines(path: str | os.PathLike[str], features: np.ndarray,
                        image_paths: Sequence[str], labels: Sequence[str]
                        ) -> None:
  """The original extractor's file: `PATH<TAB>LABEL<TAB>f1 f2 ...` per image.

  Each value is `str()` of the float32, as the original writes them (the
  shortest decimal that reads back as the same float32).
  """
  if not len(features) == len(image_paths) == len(labels):
    raise ValueError(f"{len(features)} feature rows for {len(image_paths)} "
                     f"images and {len(labels)} labels")
  with fileio.atomic_writer(path, encoding="utf-8") as f:
    for row, image, label in zip(np.asarray(features, np.float32),
                                 image_paths, labels):
      f.write(f"{image}\t{label}\t{' '.join(str(x) for x in row)}\n")


PARTIAL_SUFFIX = ".partial"  # FILE.partial/: the chunks of a features run.


def features_list_path(path: str | os.PathLike[str]) -> epath.Path:
  """Where the list of images of a features file goes: FILE.npy -> FILE.txt."""
  return fileio.as_path(path).with_suffix(".txt")


def write_features(path: str | os.PathLike[str], features: np.ndarray,
                   image_paths: Sequence[str]) -> epath.Path:
  """Writes FILE.npy and, row by row, the images' paths to FILE.txt."""
  if len(features) != len(image_paths):
    raise ValueError(f"{len(features)} feature rows for {len(image_paths)} "
                     "images")
  list_path = features_list_path(path)
  with fileio.atomic_writer(path, "wb") as f, \
      fileio.atomic_writer(list_path, encoding="utf-8") as names:
    np.save(f, np.asarray(features, np.float32))
    names.writelines(f"{p}\n" for p in image_paths)
  return list_path


def extract_features_to_file(model: LoadedModel, paths: Sequence[str],
                             out: str | os.PathLike[str], *,
                             crop: str = "center", batch_size: int = 32,
                             chunk_size: int = 1024, progress: bool = True,
                             output_format: str = "npy",
                             labels: Sequence[str] | None = None
                             ) -> tuple[np.ndarray, list[str], list[Failure]]:
  """`extract_features` for long lists, written to `out`; resumable.

  `output_format` "npy": `out` (.npy) and its list of images
  (`features_list_path`); "original": the original extractor's text file,
  with `labels` (one per input path; default empty) as its second column.

  Each chunk of `chunk_size` images is saved when it is done in
  ``<out>.partial/``; rerunning the same command (same images, checkpoint and
  crop) after a kill skips the chunks already done, so no work is lost or
  repeated. The directory is removed once `out` has been written. `out` may
  be local or remote (``gs://...``).
  """
  if output_format not in FEATURE_FORMATS:
    raise ValueError(f"output_format must be one of {FEATURE_FORMATS}, not "
                     f"{output_format!r}")
  labels = [""] * len(paths) if labels is None else list(labels)
  if len(labels) != len(paths):
    raise ValueError(f"{len(labels)} labels for {len(paths)} images")
  out = fileio.as_path(out)
  work = out.with_name(out.name + PARTIAL_SUFFIX)
  fingerprint = {
      "preprocess": "original",
      "images_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
      "num_images": len(paths), "checkpoint": model.source,
      "step": model.metadata["step"], "crop": crop, "chunk_size": chunk_size}
  manifest = work / "manifest.json"
  if manifest.exists() and json.loads(manifest.read_text()) != fingerprint:
    raise ValueError(f"{work} holds partial results of another features run "
                     "(other images, checkpoint or crop); delete it to start "
                     "over")
  work.mkdir(parents=True, exist_ok=True)
  with fileio.atomic_writer(manifest) as f:
    json.dump(fingerprint, f)

  chunks, failed, reasons = [], [], []
  starts = range(0, len(paths), chunk_size)
  for start in tqdm(starts, unit="chunk", disable=not progress,
                    desc=f"features ({chunk_size} images/chunk)"):
    part = work / f"part-{start:012d}.npz"
    if not part.exists():
      features, _, failures = extract_features(
          model, paths[start:start + chunk_size], crop=crop,
          batch_size=batch_size, progress=False)
      with fileio.atomic_writer(part, "wb") as f:
        np.savez(f, features=features,
                 failed=np.array([start + x.index for x in failures], np.int64),
                 reasons=np.array([x.reason for x in failures], str))
    with part.open("rb") as f, np.load(f) as saved:
      chunks.append(saved["features"])
      failed.extend(saved["failed"].tolist())
      reasons.extend(saved["reasons"].tolist())
  failures = [Failure(i, paths[i], r) for i, r in zip(failed, reasons)]
  skipped = set(failed)
  kept = [p for i, p in enumerate(paths) if i not in skipped]
  features = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
  if kept and output_format == "original":
    write_feature_lines(out, features, kept,
                        [x for i, x in enumerate(labels) if i not in skipped])
  elif kept:
    write_features(out, features, kept)
  work.rmtree()
  return features, kept, failures
