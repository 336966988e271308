"""Tests of mlimages_jax.train.probes: few-shot probes inside a training run.

A tiny single-label run trains on `synth_shapes` (fewshot_helpers) and
probes it every 3 steps; the probe lines of metrics.jsonl and TensorBoard
must be there (every 3 steps and at the end, at the progressive-resizing image
size), and the last one must equal `mlimages fewshot` on the final
checkpoint: the loop and the command line run the same evaluation.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import tensorflow as tf

import fewshot_helpers as helpers
from mlimages_jax.cli import main as cli_main
from mlimages_jax.train import config_validation
from mlimages_jax.train import loop

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import finetune_imagenet  # noqa: E402

KEYS = ("fewshot/synth_shapes_1shot", "fewshot/synth_shapes_5shot")


def _config(data_dir: str):
  c = finetune_imagenet.get_config("smoke")  # 32 px, then 40 from step 4.
  c.dataset, c.data_dir = "synth_shapes", data_dir
  c.build_dataset_if_missing = False
  c.freeze_blocks = 0  # From scratch: nothing to freeze.
  c.train_split, c.eval_split = "train", "test"
  c.num_train_steps, c.checkpoint_every_steps = 6, 6
  c.async_checkpoints = False
  c.num_eval_examples = 32
  c.fewshot.every_steps = 3
  c.fewshot.datasets = (("synth_shapes", "train", "test"),)
  c.fewshot.shots, c.fewshot.seeds = (1, 5), (0, 1)
  c.fewshot.pool_per_class, c.fewshot.num_test_examples = 5, 48
  c.fewshot.batch_size = 16
  return c


@pytest.mark.slow  # A training run with 2 probes, then the command line.
def test_probes_are_logged_and_match_the_command_line(tmp_path, capsys):
  data_dir = helpers.build(tmp_path / "tfds")
  workdir = tmp_path / "work"
  loop.train_and_evaluate(_config(data_dir), workdir)
  lines = [json.loads(line) for line in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  probes = [line for line in lines if KEYS[0] in line]
  assert [p["step"] for p in probes] == [3, 6]
  assert [p["fewshot_image_size"] for p in probes] == [32, 40]
  for p in probes:
    assert all(0 <= p[k] <= 1 for k in KEYS) and p["fewshot_seconds"] > 0

  tags = set()
  for events in workdir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(events)):
      tags.update(v.tag for v in event.summary.value)
  assert set(KEYS) <= tags

  capsys.readouterr()
  assert cli_main(["fewshot", "--checkpoint", str(workdir), "--dataset",
                   "synth_shapes,train,test", "--data-dir", data_dir,
                   "--shots", "1", "5", "--seeds", "0", "1",
                   "--batch-size", "16", "--pool-per-class", "5",
                   "--num-test-examples", "48", "--no-progress"]) == 0
  cli = json.loads(capsys.readouterr().out)
  assert cli["step"] == 6 and cli["image_size"] == 40
  # Same float32 network, inputs and batches: the same predictions.
  assert {f"fewshot/{k}": v for k, v in cli["accuracy"].items()} == {
      k: probes[-1][k] for k in KEYS}


@pytest.mark.parametrize("change, message", [
    ({"datasets": ()}, "no few-shot datasets"),
    ({"shots": (1, 80)}, r"shots \(1, 80\) must be in 1..pool_per_class"),
    ({"batch_size": 12}, "not divisible"),
    ({"datasets": (("cifar100", "train"),)}, "train split, test split"),
])
def test_bad_fewshot_settings_fail_validation(change, message):
  config = _config("")
  config.fewshot.update(change)
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate_config(config)
