"""The README's path to a real dataset, at toy scale, as a user types it.

Open Images part: a URL list served over real HTTP on 127.0.0.1 goes through
`mlimages download`; ImageNet part: an image-ID list goes through `mlimages
imagenet21k extract` from a local ImageNet-style tree. Both lists carry leaf
labels only (like the released lists before closure); `mlimages labels
augment` closes them, `mlimages dedup --drop --in-place` finds no duplicate
among distinct images, `mlimages labels stats` describes them, `tfds build
--config=full` packages the manual directory, `main.py` pre-trains on it, and
`mlimages evaluate` / `classify` / `features` use the checkpoint. Each stage
reads only what the previous one wrote, so a broken hand-over anywhere fails
here even when every module passes its own tests.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mlimages_jax.data import annotation_reader
from mlimages_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
# (split, Open Images images, ImageNet images): 32 + 16 training images.
SPLITS = (("train", 20, 12), ("validation", 10, 6))


def _run(*command: str, cwd: pathlib.Path = REPO) -> str:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, (command, result.stdout[-2000:],
                                  result.stderr[-3000:])
  return result.stdout


def _mlimages(*args: str) -> str:
  return _run(sys.executable, "-m", "mlimages_jax", *args)


def _leaf_line(key: str, example: synthetic.SyntheticExample,
               leaves: set[int]) -> str:
  """The example's leaf labels only, as the released (unclosed) lists."""
  kept = [int(i) for i in example.labels if int(i) in leaves]
  return key + "\t" + "\t".join(f"{i}:1" for i in kept)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args) -> None:
    del args


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
  """A web server with Open Images-style URLs and an ImageNet-style tree."""
  root = tmp_path_factory.mktemp("sources")
  hierarchy = synthetic.synthetic_hierarchy()
  hierarchy.write(root / "dictionary_and_semantic_hierarchy.txt")
  leaves = set(int(i) for i in hierarchy.leaves())
  served, imagenet = root / "web", root / "imagenet21k"
  handler = functools.partial(_QuietHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{server.server_address[1]}"
  expected = {}  # (part, split) -> {file name in im_list.txt: example}
  for split, num_open, num_imagenet in SPLITS:
    url_lines, id_lines = [], []
    for i in range(num_open + num_imagenet):
      example = synthetic.generate_example(hierarchy, split, i)
      if i < num_open:
        path = served / f"farm{i % 3}" / f"{split}{i}_o.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(example.jpeg)
        url_lines.append(_leaf_line(f"{base}/farm{i % 3}/{path.name}",
                                    example, leaves))
        name = f"farm{i % 3}_{path.name}"  # The documented naming rule.
        expected.setdefault(("openimages", split), {})[name] = example
      else:
        wnid = hierarchy.wnids[int(example.labels[-1])]
        key = f"{wnid}/{wnid}_{split}{i}.JPEG"
        (imagenet / wnid).mkdir(parents=True, exist_ok=True)
        (imagenet / key).write_bytes(example.jpeg)
        id_lines.append(_leaf_line(key, example, leaves))
        # The extractor names the file as in the synset tar: <wnid>_<n>.JPEG.
        expected.setdefault(("imagenet", split), {})[key.split("/")[1]] = (
            example)
    (root / f"{split}_urls.txt").write_text("\n".join(url_lines) + "\n")
    (root / f"{split}_image_id_from_imagenet.txt").write_text(
        "\n".join(id_lines) + "\n")
  yield {"root": root, "hierarchy": hierarchy, "expected": expected}
  server.shutdown()


@pytest.fixture(scope="module")
def manual_dir(sources, tmp_path_factory) -> pathlib.Path:
  """Acquisition and annotation, the README's "Build the real dataset"."""
  root, manual = sources["root"], tmp_path_factory.mktemp("manual")
  dictionary = root / "dictionary_and_semantic_hierarchy.txt"
  shutil.copy(dictionary, manual / dictionary.name)
  for split, _, _ in SPLITS:
    for part, command in (
        ("openimages", ["download", str(root / f"{split}_urls.txt")]),
        ("imagenet", ["imagenet21k", "extract",
                      str(root / f"{split}_image_id_from_imagenet.txt"),
                      "--imagenet", str(root / "imagenet21k")])):
      out = manual / part / split
      _mlimages(*command, "--out", str(out), "--no-progress")
      raw = out / "im_list.txt"
      _mlimages("labels", "augment", str(raw), str(out / "closed.txt"),
                "--dictionary", str(dictionary))
      os.replace(out / "closed.txt", raw)
  report = json.loads(_mlimages("hierarchy", "stats", "--dictionary",
                                str(manual / dictionary.name), "--json"))
  assert report["num_categories"] == sources["hierarchy"].num_classes
  _mlimages("dedup", str(manual / "imagenet/train"),
            str(manual / "openimages/train"), "--out", str(root / "dups.tsv"),
            "--drop", "--in-place", "--no-progress")
  _mlimages("labels", "stats", str(manual / "openimages/train/im_list.txt"),
            str(manual / "imagenet/train/im_list.txt"), "--dictionary",
            str(dictionary), "--out", str(manual / "stats"))
  return manual


@pytest.mark.slow
def test_acquisition_writes_closed_lists_and_images(sources, manual_dir):
  hierarchy = sources["hierarchy"]
  for (part, split), examples in sources["expected"].items():
    folder = manual_dir / part / split
    rows = list(annotation_reader.read_annotation_file(
        folder / "im_list.txt"))
    assert len(rows) == len(examples)
    for key, indices, confidences in rows:
      example = examples[key]
      # Closed over ancestors: exactly the generator's closed label set.
      np.testing.assert_array_equal(indices, example.labels)
      np.testing.assert_array_equal(confidences, example.confidences)
      image = folder / "images" / key
      assert image.read_bytes() == example.jpeg, image
  stats = json.loads((manual_dir / "stats" / "stats.json").read_text())
  assert stats["num_images"] == 32
  assert 0 < stats["num_classes"] <= hierarchy.num_classes
  assert sorted(p.name for p in (manual_dir / "stats").glob("*.png")) == [
      "hist_num_annotations.png", "num_images_per_class.png"]


@pytest.fixture(scope="module")
def data_dir(manual_dir, tmp_path_factory) -> pathlib.Path:
  data = tmp_path_factory.mktemp("tfds")
  tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
  _run(str(tfds_cli), "build", "tfds_builder/ml_images",
       "--config=full", f"--manual_dir={manual_dir}", f"--data_dir={data}")
  return data


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory) -> pathlib.Path:
  work = tmp_path_factory.mktemp("pretrain")
  _run(sys.executable, "main.py", "--config=configs/pretrain.py:smoke",
       f"--workdir={work}", "--config.dataset=ml_images/full",
       f"--config.data_dir={data_dir}", "--config.batch_size=8",
       "--config.schedule.reference_batch_size=8",
       "--config.build_dataset_if_missing=False", "--config.num_train_steps=4",
       "--config.eval_batch_size=8", "--config.num_eval_examples=-1")
  return work


@pytest.mark.slow
def test_build_train_evaluate_classify(sources, data_dir, workdir, tmp_path):
  import mlimages_jax.datasets.ml_images  # noqa: F401  (registers ml_images)
  hierarchy = sources["hierarchy"]
  built = tfds.builder("ml_images/full", data_dir=str(data_dir))
  assert built.info.splits["train"].num_examples == 32
  assert built.info.splits["validation"].num_examples == 16
  assert list(built.info.metadata["wnids"]) == list(hierarchy.wnids)
  by_name = {name: (part, example)
             for (part, _), examples in sources["expected"].items()
             for name, example in examples.items()}
  for ex in tfds.as_numpy(built.as_dataset(split="validation")):
    part, example = by_name[ex["file_name"].decode()]
    assert ex["source"].decode() == part
    np.testing.assert_array_equal(np.sort(ex["labels"]), example.labels)

  lines = [json.loads(l) for l in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(l["step"] for l in lines if "loss" in l) == 4
  evals = [l for l in lines if "mAP" in l]
  assert evals and 0.0 < evals[-1]["mAP"] <= 1.0

  # Evaluation of the whole validation split reproduces the training-time one.
  _mlimages("evaluate", "--checkpoint", str(workdir), "--dataset",
            "ml_images/full", "--data-dir", str(data_dir), "--batch-size", "8",
            "--workdir", str(tmp_path / "eval"), "--no-progress")
  results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
  assert results["step"] == 4 and results["class_ids"] == list(hierarchy.wnids)
  at_32 = results["results"]["32"]
  assert at_32["num_examples"] == 16
  assert abs(at_32["map"] - evals[-1]["mAP"]) < 1e-4

  images = sorted((sources["root"] / "web").rglob("*.jpg"))[:3]
  _mlimages("classify", *map(str, images), "--checkpoint", str(workdir),
            "--top-k", "3", "--out", str(tmp_path / "label_pred.txt"),
            "--no-progress")
  predictions = (tmp_path / "label_pred.txt").read_text().splitlines()
  assert len(predictions) >= 3
  _mlimages("features", *map(str, images), "--checkpoint", str(workdir),
            "--out", str(tmp_path / "feats.npy"), "--no-progress")
  features = np.load(tmp_path / "feats.npy")
  assert features.shape[0] == 3 and np.isfinite(features).all()
