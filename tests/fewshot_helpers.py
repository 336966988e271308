"""A TFDS classification dataset generated here, for the few-shot tests.

`synth_shapes`: the synthetic single-label task (mlimages_jax.data.synthetic:
the shape of the image's object, 6 classes) restricted to the images that
hold one object, at 32 px, with a plain `label` feature like the public
datasets a user would probe (cifar100, dtd, ...). Builds in about a second.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from mlimages_jax.data import synthetic

IMAGE_SIZE = 32
SIZES = {"train": 120, "test": 240}


def single_object_examples(split: str, count: int, seed: int
                           ) -> list[synthetic.SyntheticExample]:
  """The synthetic examples that hold one object (45 % of them): at 32 px
  the shape of a lone object is what a small backbone can learn quickly."""
  hierarchy = synthetic.synthetic_hierarchy()
  examples, index = [], 0
  while len(examples) < count:
    ex = synthetic.generate_example(hierarchy, split, index,
                                    image_size=IMAGE_SIZE, seed=seed)
    if len(ex.objects) == 1:
      examples.append(ex)
    index += 1
  return examples


class SynthShapes(tfds.core.GeneratorBasedBuilder):
  """The synthetic single-label task (6 shapes) as a plain `label` dataset."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(
                names=synthetic.SINGLE_LABEL_NAMES)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in SIZES}

  def _generate_examples(self, split):
    for ex in single_object_examples(split, SIZES[split], seed=5):
      yield ex.key, {"image": ex.jpeg,
                     "label": synthetic.single_label(ex.labels)}


def build(data_dir: str | pathlib.Path) -> str:
  SynthShapes(data_dir=data_dir).download_and_prepare()
  return str(data_dir)


# ---------------------------------------------------------------------------
# Multi-host worker: python fewshot_helpers.py CKPT DATA_DIR OUT ID COUNT PORT

MULTIHOST = dict(shots=(1, 5), seeds=(0, 1, 2), batch_size=8,
                 pool_per_class=5, num_test_examples=-1)


def fewshot_worker(checkpoint: str, data_dir: str, out: str, process_id: int,
                   num_processes: int, port: int) -> None:
  """One process of a multi-host few-shot evaluation; writes its results."""
  import json

  from mlimages_jax.evaluation import fewshot
  from mlimages_jax.inference import predict
  from mlimages_jax.train import distributed

  distributed.initialize_distributed(f"127.0.0.1:{port}", num_processes,
                                     process_id)
  evaluator = fewshot.FewshotEvaluator(
      [fewshot.Task("synth_shapes", "train", "test")], data_dir=data_dir,
      **MULTIHOST)
  result = fewshot.evaluate_checkpoint(predict.LoadedModel.load(checkpoint),
                                       evaluator)
  pathlib.Path(out).write_text(json.dumps(result["accuracy"]))


if __name__ == "__main__":
  import sys
  fewshot_worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                 int(sys.argv[5]), int(sys.argv[6]))
