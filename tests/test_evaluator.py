"""Tests for mlimages_jax.evaluation.evaluator on tiny TFDS datasets built here.

The evaluation's numbers are compared with references computed from the same
network applied directly to the same evaluation preprocessing: AP with
scikit-learn, top-k precision/recall/F1 and accuracy with plain loops.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.metrics import average_precision_score

from mlimages_jax.checkpoints import store
from mlimages_jax.evaluation import evaluator
from mlimages_jax.evaluation import metrics
from mlimages_jax.inputs import preprocessing
from mlimages_jax.cli import main as cli_main
from mlimages_jax.models import resnet

NUM_CLASSES = 7
WNIDS = [f"n{i:08d}" for i in range(NUM_CLASSES)]
NAMES = [f"class {i}" for i in range(NUM_CLASSES)]
PARENTS = [-1, 0, 0, 1, 1, 2, -1]  # Depths 0, 1, 1, 2, 2, 2, 0.
DEPTHS = [0, 1, 1, 2, 2, 2, 0]
NUM_VALIDATION = 21  # Not a multiple of the batch: the last batch is padded.
WIDTH = 0.0625


def _jpeg(rng: np.random.Generator) -> bytes:
  h, w = rng.integers(20, 60, size=2)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
      buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def multi_labels(index: int) -> tuple[list[int], list[float]]:
  """Deterministic labels: positives (1.0 or 0.7), ignored (-1) entries."""
  rng = np.random.default_rng(100 + index)
  classes = sorted(rng.choice(NUM_CLASSES - 1, size=3, replace=False))
  return [int(c) for c in classes], [1.0, 0.7 if index % 3 else -1.0,
                                     1.0 if index % 2 else -1.0]


class EvalTinyMulti(tfds.core.GeneratorBasedBuilder):
  """ml_images-like features with a 3-level hierarchy in the metadata."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "labels": tfds.features.Sequence(
                tfds.features.ClassLabel(names=WNIDS)),
            "confidences": tfds.features.Sequence(np.float32),
        }),
        metadata=tfds.core.MetadataDict(wnids=WNIDS, names=NAMES,
                                        parents=PARENTS))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for index in range(NUM_VALIDATION):
      labels, confidences = multi_labels(index)
      yield index, {"image": _jpeg(rng), "labels": labels,
                    "confidences": confidences}


class EvalTinySingle(tfds.core.GeneratorBasedBuilder):
  """An imagenet2012-like single-label dataset."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=WNIDS),
    }))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(1)
    for index in range(NUM_VALIDATION - 2):
      yield index, {"image": _jpeg(rng), "label": index % NUM_CLASSES}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("tfds")
  EvalTinyMulti(data_dir=path).download_and_prepare()
  EvalTinySingle(data_dir=path).download_and_prepare()
  return str(path)


@functools.cache
def tiny_variables() -> dict:
  model = resnet.create_model(14, NUM_CLASSES, width_multiplier=WIDTH)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  return jax.tree.map(np.asarray, variables)


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory) -> dict[str, str]:
  paths = {}
  for mode in ("multi", "single"):
    path = tmp_path_factory.mktemp("ckpt") / mode
    store.save_inference_checkpoint(
        path, tiny_variables(), store.make_metadata(
            depth=14, num_classes=NUM_CLASSES, width_multiplier=WIDTH,
            image_size=32, label_mode=mode, class_ids=WNIDS,
            class_names=NAMES, step=11))
    paths[mode] = str(path)
  return paths


def reference_logits(data_dir: str, name: str, image_size: int):
  """The network applied directly to each example's §7 eval preprocessing."""
  model = resnet.create_model(14, NUM_CLASSES, width_multiplier=WIDTH)
  apply = jax.jit(lambda v, x: model.apply(v, preprocessing.normalize(x),
                                           train=False)[0])
  ds = tfds.load(name, data_dir=data_dir, split="validation",
                 decoders={"image": tfds.decode.SkipDecoding()})
  config = preprocessing.PreprocessConfig.for_mode("eval")
  logits, targets = [], []
  for ex in ds:
    image = preprocessing.eval_image(ex["image"], image_size=image_size,
                                     config=config)
    logits.append(np.asarray(apply(tiny_variables(), image.numpy()[None]))[0])
    if "label" in ex:
      targets.append(int(ex["label"]))
    else:
      dense = np.zeros(NUM_CLASSES, np.float32)
      dense[ex["labels"].numpy()] = ex["confidences"].numpy()
      targets.append(dense)
  return np.stack(logits), np.stack(targets)


def reference_top_k(logits: np.ndarray, labels: np.ndarray, k: int):
  """Loop-by-loop P/R/F1 at k (ignored entries removed before ranking)."""
  tp = np.zeros(NUM_CLASSES)
  predicted = np.zeros(NUM_CLASSES)
  positives = (labels > 0).sum(axis=0)
  per_image = []
  for row, label in zip(logits, labels):
    valid = [c for c in range(NUM_CLASSES) if label[c] >= 0]
    top = sorted(valid, key=lambda c: -row[c])[:k]
    hits = sum(label[c] > 0 for c in top)
    for c in top:
      predicted[c] += 1
      tp[c] += label[c] > 0
    if (label > 0).any():
      p, r = hits / len(top), hits / (label > 0).sum()
      per_image.append((p, r, 2 * p * r / (p + r) if hits else 0.0))
  has = positives > 0
  cp = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
  cr = np.where(has, tp / np.maximum(positives, 1), 0.0)
  return {"per_class": (cp[has].mean(), cr[has].mean()),
          "per_image": tuple(np.mean(per_image, axis=0)),
          "cp": cp, "cr": cr}


def test_multi_label_metrics_equal_reference(data_dir, checkpoint_dirs,
                                             tmp_path):
  workdir = tmp_path / "eval"
  results = evaluator.evaluate_checkpoint(
      checkpoint_dirs["multi"], dataset="eval_tiny_multi", data_dir=data_dir,
      split="validation", image_size=32, batch_size=8, workdir=workdir,
      top_k=(1, 3), progress=False)
  written = json.loads((workdir / evaluator.RESULTS_FILE).read_text())
  assert written == {k: v for k, v in results.items() if k != "path"}
  assert written["step"] == 11 and written["label_mode"] == "multi"
  r = written["results"]["32"]
  assert r["num_examples"] == NUM_VALIDATION and r["decode_failures"] == 0

  logits, labels = reference_logits(data_dir, "eval_tiny_multi", 32)
  ap = np.full(NUM_CLASSES, np.nan)
  for c in range(NUM_CLASSES):
    keep = labels[:, c] >= 0
    if (labels[keep, c] > 0).any():
      ap[c] = average_precision_score(labels[keep, c] > 0, logits[keep, c])
  assert np.isnan(ap[6]) and np.isfinite(ap[:6]).all()
  assert r["per_class"]["ap"][6] is None
  np.testing.assert_allclose(np.array(r["per_class"]["ap"][:6], float),
                             ap[:6], atol=1e-6)
  assert r["map"] == pytest.approx(np.nanmean(ap), abs=1e-6)
  for depth in (0, 1, 2):
    in_depth = [ap[c] for c in range(6) if DEPTHS[c] == depth]
    assert r["map_by_depth"][str(depth)]["map"] == pytest.approx(
        np.mean(in_depth), abs=1e-6)
    assert r["map_by_depth"][str(depth)]["num_classes"] == len(in_depth)
  for k in (1, 3):
    ref = reference_top_k(logits, labels, k)
    got = r[f"top{k}"]
    assert (got["per_class"]["precision"], got["per_class"]["recall"]) == (
        pytest.approx(ref["per_class"], abs=1e-9))
    assert (got["per_image"]["precision"], got["per_image"]["recall"],
            got["per_image"]["f1"]) == pytest.approx(ref["per_image"],
                                                     abs=1e-9)
    np.testing.assert_allclose(r["per_class"][f"precision@{k}"], ref["cp"])
    np.testing.assert_allclose(r["per_class"][f"recall@{k}"], ref["cr"])


def test_single_label_top1_top5_at_two_sizes_via_cli(data_dir, checkpoint_dirs,
                                                     tmp_path, capsys):
  workdir = tmp_path / "eval"
  code = cli_main(["evaluate", "--checkpoint", checkpoint_dirs["single"],
                   "--dataset", "eval_tiny_single", "--data-dir", data_dir,
                   "--image-size", "32", "--image-size", "64",
                   "--batch-size", "16", "--workdir", str(workdir),
                   "--no-progress"])
  assert code == 0
  printed = json.loads(capsys.readouterr().out)
  written = json.loads((workdir / evaluator.RESULTS_FILE).read_text())
  assert set(written["results"]) == {"32", "64"}
  assert printed["results"] == written["results"]
  for size in (32, 64):
    logits, targets = reference_logits(data_dir, "eval_tiny_single", size)
    order = np.argsort(-logits, axis=1)
    got = written["results"][str(size)]
    assert got["num_examples"] == NUM_VALIDATION - 2
    assert got["top1"] == pytest.approx(np.mean(order[:, 0] == targets))
    assert got["top5"] == pytest.approx(
        np.mean((order[:, :5] == targets[:, None]).any(axis=1)))


def test_mismatched_checkpoint_and_dataset(data_dir, checkpoint_dirs, tmp_path,
                                           capsys):
  other = tmp_path / "other"
  variables = tiny_variables()
  store.save_inference_checkpoint(
      other, variables, store.make_metadata(
          depth=14, num_classes=NUM_CLASSES, width_multiplier=WIDTH,
          image_size=32, label_mode="multi", class_ids=WNIDS[::-1],
          class_names=NAMES[::-1]))
  with pytest.raises(evaluator.EvaluationError, match="order their classes"):
    evaluator.evaluate_checkpoint(other, dataset="eval_tiny_multi",
                                 data_dir=data_dir, workdir=tmp_path / "w",
                                 batch_size=8, progress=False)
  with pytest.raises(evaluator.EvaluationError, match="not divisible"):
    evaluator.evaluate_checkpoint(checkpoint_dirs["multi"],
                                 dataset="eval_tiny_multi", data_dir=data_dir,
                                 workdir=tmp_path / "w", batch_size=12)
  # A multi-label checkpoint on a dataset without multi-label targets.
  assert cli_main(["evaluate", "--checkpoint", checkpoint_dirs["multi"],
                   "--dataset", "eval_tiny_single", "--data-dir", data_dir,
                   "--batch-size", "8", "--workdir", str(tmp_path / "w")]) == 1
  assert "cannot be evaluated" in capsys.readouterr().err
  assert cli_main(["evaluate", "--checkpoint", checkpoint_dirs["multi"],
                   "--dataset", "eval_tiny_multi", "--data-dir",
                   str(tmp_path / "empty"), "--batch-size", "8",
                   "--workdir", str(tmp_path / "w")]) == 1
  assert "tfds build" in capsys.readouterr().err
  assert not (tmp_path / "w" / evaluator.RESULTS_FILE).exists()


def test_killed_evaluation_resumes(data_dir, checkpoint_dirs, tmp_path,
                                   monkeypatch):
  """Killed after 2 saved batches, a rerun evaluates only the rest."""
  kwargs = dict(dataset="eval_tiny_multi", data_dir=data_dir, batch_size=8,
                save_every=1, progress=False)
  reference = evaluator.evaluate_checkpoint(
      checkpoint_dirs["multi"], workdir=tmp_path / "ref", **kwargs)
  assert [p.name for p in (tmp_path / "ref").iterdir()] == [
      evaluator.RESULTS_FILE]  # Progress and spilled scores are cleaned up.
  updates = _die_on_third_batch(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    evaluator.evaluate_checkpoint(checkpoint_dirs["multi"],
                                 workdir=tmp_path / "w", **kwargs)
  assert not (tmp_path / "w" / evaluator.RESULTS_FILE).exists()
  updates.clear()
  resumed = evaluator.evaluate_checkpoint(checkpoint_dirs["multi"],
                                         workdir=tmp_path / "w", **kwargs)
  assert len(updates) == 1  # 3 batches of 8 for 21 examples: 2 were saved.
  for key in ("num_examples", "map", "map_by_depth", "top1", "top5",
              "per_class", "decode_failures"):
    assert resumed["results"]["32"][key] == reference["results"]["32"][key]
  assert not (tmp_path / "w" / evaluator.PROGRESS_DIR).exists()


def _die_on_third_batch(monkeypatch) -> list[int]:
  """Makes the accumulator's third update raise KeyboardInterrupt (a kill
  mid-evaluation); returns the list that counts the updates."""
  real_update = metrics.MultiLabelAccumulator.update
  updates = []

  def dies_on_third_batch(self, *args, **update_kwargs):
    updates.append(1)
    if len(updates) == 3:
      raise KeyboardInterrupt
    real_update(self, *args, **update_kwargs)

  monkeypatch.setattr(metrics.MultiLabelAccumulator, "update",
                      dies_on_third_batch)
  return updates


def test_remote_data_dir_and_workdir(data_dir, checkpoint_dirs, tmp_path,
                                     monkeypatch):
  """The dataset read from, and the results written to, a non-local
  filesystem (TF's ram://, reached through epath like gs://): the same
  numbers as locally; the spilled scores and progress stay on the local disk
  and are removed, and a killed evaluation resumes from there."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from remote_helpers import route_ram_through_epath  # pylint: disable=g-import-not-at-top
  root = route_ram_through_epath(monkeypatch)
  for directory, _, files in tf.io.gfile.walk(data_dir):
    target = f"{root}/tfds/{os.path.relpath(directory, data_dir)}"
    tf.io.gfile.makedirs(target)
    for name in files:
      tf.io.gfile.copy(f"{directory}/{name}", f"{target}/{name}")
  kwargs = dict(dataset="eval_tiny_multi", batch_size=8, save_every=1,
                progress=False)
  local = evaluator.evaluate_checkpoint(
      checkpoint_dirs["multi"], data_dir=data_dir, workdir=tmp_path / "w",
      **kwargs)
  workdir = f"{root}/eval"
  progress = evaluator._progress_root(epath.Path(workdir))  # pylint: disable=protected-access
  assert not str(progress).startswith("ram:")  # A local directory.
  updates = _die_on_third_batch(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    evaluator.evaluate_checkpoint(checkpoint_dirs["multi"],
                                  data_dir=f"{root}/tfds", workdir=workdir,
                                  **kwargs)
  assert progress.is_dir()
  updates.clear()
  remote = evaluator.evaluate_checkpoint(
      checkpoint_dirs["multi"], data_dir=f"{root}/tfds", workdir=workdir,
      **kwargs)
  assert len(updates) == 1  # Resumed after the 2 saved batches.
  assert remote["path"] == f"{workdir}/{evaluator.RESULTS_FILE}"
  written = json.loads(epath.Path(remote["path"]).read_text())
  for key in ("num_examples", "map", "map_by_depth", "top1", "per_class"):
    assert written["results"]["32"][key] == local["results"]["32"][key]
  assert [p.name for p in epath.Path(workdir).iterdir()] == [
      evaluator.RESULTS_FILE]
  assert not progress.exists()


def _worker(out: str, data_dir: str, checkpoint: str, process_id: int,
            num_processes: int, port: int) -> None:
  """One process of a (multi-process) evaluation: ``python THIS_FILE ...``."""
  from mlimages_jax.train import distributed  # pylint: disable=g-import-not-at-top
  if num_processes > 1:
    distributed.initialize_distributed(f"127.0.0.1:{port}", num_processes,
                                       process_id)
  assert jax.device_count() == 4
  evaluator.evaluate_checkpoint(checkpoint, dataset="eval_tiny_multi",
                               data_dir=data_dir, batch_size=8, workdir=out,
                               progress=False)


def _run_workers(tmp: pathlib.Path, data_dir: str, checkpoint: str,
                 num_processes: int) -> dict:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count="
             f"{4 // num_processes}")
  out = tmp / f"{num_processes}proc"
  workers = [subprocess.Popen(
      [sys.executable, __file__, str(out), data_dir, checkpoint, str(i),
       str(num_processes), str(port)], env=env) for i in range(num_processes)]
  assert [w.wait(timeout=300) for w in workers] == [0] * num_processes
  result = json.loads((out / evaluator.RESULTS_FILE).read_text())["results"]
  for r in result.values():
    del r["seconds"], r["images_per_second"]
  return result


@pytest.mark.slow
def test_two_processes_equal_one(data_dir, checkpoint_dirs, tmp_path):
  """2 processes x 2 devices (gloo) give exactly the 1 x 4 devices metrics."""
  one = _run_workers(tmp_path, data_dir, checkpoint_dirs["multi"], 1)
  two = _run_workers(tmp_path, data_dir, checkpoint_dirs["multi"], 2)
  assert one["32"]["num_examples"] == NUM_VALIDATION
  # Equal up to float summation order (the processes' examples interleave
  # differently in the gathered batches).
  flat_one, flat_two = (_flatten(r) for r in (one, two))
  assert flat_two.keys() == flat_one.keys()
  for key, value in flat_one.items():
    assert flat_two[key] == (value if value is None else pytest.approx(
        value, rel=1e-6, abs=1e-9)), key


def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    return {k: v for name, sub in tree.items()
            for k, v in _flatten(sub, f"{prefix}/{name}").items()}
  if isinstance(tree, list):
    return {k: v for i, sub in enumerate(tree)
            for k, v in _flatten(sub, f"{prefix}/{i}").items()}
  return {prefix: tree}


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))


def test_results_never_go_into_the_checkpoint(tmp_path, capsys):
  """--workdir = the run evaluated: refused before anything is loaded."""
  (tmp_path / "config.json").write_text("{}")
  assert cli_main(["evaluate", "--checkpoint", str(tmp_path), "--dataset",
                   "eval_tiny_single", "--workdir", str(tmp_path),
                   "--no-progress"]) == 1
  err = capsys.readouterr().err
  assert err == (f"error: --workdir {tmp_path}/eval_results.json is inside "
                 f"the input --checkpoint {tmp_path}: refusing to write over "
                 "an input\n")
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
