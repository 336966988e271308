"""Tests of mlimages_jax.evaluation.fewshot and `mlimages fewshot`.

The closed form is checked against scikit-learn's Ridge; the evaluator runs
on a real TFDS build of generated data (synthetic shapes: 6 classes, see
fewshot_helpers), where a trained backbone must beat the same network at
its random init.
"""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import fewshot_helpers as helpers
from mlimages_jax.checkpoints import store
from mlimages_jax.cli import main as cli_main
from mlimages_jax.data import synthetic
from mlimages_jax.evaluation import fewshot
from mlimages_jax.inference import predict
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet

sklearn_linear = pytest.importorskip("sklearn.linear_model")  # Test-only.

WIDTH = 0.125
STEPS = 150  # Of pre-training, batch 32.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return helpers.build(tmp_path_factory.mktemp("tfds"))


def _metadata(step: int) -> dict:
  names = list(synthetic.SINGLE_LABEL_NAMES)
  return store.make_metadata(
      depth=14, num_classes=len(names), width_multiplier=WIDTH,
      image_size=helpers.IMAGE_SIZE, label_mode="single", class_ids=names,
      class_names=names, step=step)


@functools.cache
def backbones() -> dict[str, dict]:
  """Random init, and the same init after STEPS steps of supervised
  training (softmax over the 6 shapes, Adam) on synthetic images that the
  probes never see."""
  # Momentum 0.9: the BN moving statistics settle within the few steps.
  model = resnet.create_model(14, len(synthetic.SHAPES),
                              width_multiplier=WIDTH, bn_momentum=0.9)
  examples = helpers.single_object_examples("train", 480, seed=9)
  images = np.stack([np.asarray(Image.open(io.BytesIO(ex.jpeg)))
                     for ex in examples])
  labels = np.array([synthetic.single_label(ex.labels) for ex in examples])
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, helpers.IMAGE_SIZE, helpers.IMAGE_SIZE, 3)))
  tx = optax.adam(3e-3)

  def loss(params, stats, x, y):
    (logits, _), updated = model.apply(
        {"params": params, "batch_stats": stats}, preprocessing.normalize(x),
        train=True, mutable=["batch_stats"])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            updated["batch_stats"])

  @jax.jit
  def train_step(params, stats, opt_state, x, y):
    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(
        params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state

  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    batch = rng.choice(len(examples), 32, replace=False)
    params, stats, opt_state = train_step(params, stats, opt_state,
                                          images[batch], labels[batch])
  as_numpy = functools.partial(jax.tree.map, np.asarray)
  return {"random": as_numpy(dict(variables)),
          "trained": as_numpy({"params": params, "batch_stats": stats})}

# ---------------------------------------------------------------------------
# The closed form.


@pytest.mark.parametrize("n, d", [(40, 9), (12, 30)])  # Primal and dual.
def test_ridge_weights_match_scikit_learn(n, d):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, d))
  targets = 2.0 * np.eye(4)[rng.integers(0, 4, n)] - 1.0
  ridge = sklearn_linear.Ridge(alpha=3.0, fit_intercept=False).fit(x, targets)
  # Both solve the same well-conditioned float64 system: agreement to ~1e-12
  # relative; 1e-9 still catches any wrong term (l2 scaling, transpose).
  np.testing.assert_allclose(fewshot.ridge_weights(x, targets, 3.0),
                             ridge.coef_.T, rtol=1e-9, atol=1e-12)


def test_probe_accuracy_matches_a_scikit_learn_pipeline():
  """Standardise with the train statistics, a constant 100 column for the
  bias, ±1 one-hot targets, ridge, argmax: written with scikit-learn."""
  rng = np.random.default_rng(0)
  num_classes, d = 5, 16
  centres = rng.normal(0, 1, (num_classes, d))
  y_train = np.repeat(np.arange(num_classes), 3)
  y_test = rng.integers(0, num_classes, 200)
  x_train = centres[y_train] + rng.normal(0, 1.5, (len(y_train), d))
  x_test = centres[y_test] + rng.normal(0, 1.5, (len(y_test), d))
  for l2 in (0.1, 10.0, 1024.0):
    scaler = sklearn_preprocessing().StandardScaler().fit(x_train)
    bias = lambda x: np.hstack([x, np.full((len(x), 1), 100.0)])
    ridge = sklearn_linear.Ridge(alpha=l2, fit_intercept=False).fit(
        bias(scaler.transform(x_train)), 2.0 * np.eye(num_classes)[y_train]
        - 1.0)
    want = np.mean(ridge.predict(bias(scaler.transform(x_test))).argmax(1)
                   == y_test)
    got = fewshot.probe_accuracy(x_train, y_train, x_test, y_test,
                                 num_classes, l2)
    assert got == want, l2  # StandardScaler has no +1e-5: std is ~1.5 here.
    assert 0.3 < got  # Well above chance (0.2): the probe learns.


def sklearn_preprocessing():
  return pytest.importorskip("sklearn.preprocessing")


def test_sample_shots_per_class_and_seed():
  labels = np.array([0, 1, 2, 0, 1, 0, 2, 0, 1])
  a = fewshot.sample_shots(labels, 2, seed=0, num_classes=3)
  assert sorted(labels[a].tolist()) == [0, 0, 1, 1, 2, 2]
  assert a.tolist() == fewshot.sample_shots(labels, 2, 0, 3).tolist()
  assert any(fewshot.sample_shots(labels, 2, s, 3).tolist() != a.tolist()
             for s in range(1, 5))
  # A class with fewer examples than shots contributes all of them.
  assert sorted(labels[fewshot.sample_shots(labels, 3, 0, 3)].tolist()) == [
      0, 0, 0, 1, 1, 1, 2, 2]


def test_invalid_settings_are_refused():
  task = [fewshot.Task("x")]
  with pytest.raises(ValueError, match="pool_per_class"):
    fewshot.FewshotEvaluator(task, shots=(1, 60), pool_per_class=50)
  with pytest.raises(ValueError, match="divisible"):
    fewshot.FewshotEvaluator(task, batch_size=9)
  with pytest.raises(ValueError, match="train split, test split"):
    fewshot.tasks_from_config([("cifar100", "train")])


# ---------------------------------------------------------------------------
# The evaluator on a real TFDS build.


def _evaluator(data_dir: str, **kwargs) -> fewshot.FewshotEvaluator:
  kwargs = {"shots": (1, 5, 10), "seeds": tuple(range(5)), "batch_size": 16,
            "pool_per_class": 10, "num_test_examples": -1, **kwargs}
  return fewshot.FewshotEvaluator(
      [fewshot.Task("synth_shapes", "train", "test")], data_dir=data_dir,
      **kwargs)


@pytest.mark.slow  # 150 training steps: ~15 s on 2 quiet cores.
def test_trained_backbone_beats_random_one(data_dir):
  results = {}
  for name, variables in backbones().items():
    model = predict.LoadedModel(variables, _metadata(step=0))
    results[name] = fewshot.evaluate_checkpoint(model, _evaluator(data_dir))
  trained = results["trained"]["accuracy"]
  random = results["random"]["accuracy"]
  assert set(trained) == {"synth_shapes_1shot", "synth_shapes_5shot",
                          "synth_shapes_10shot"}
  # Measured (1/5/10 shots): random 0.18/0.22/0.23 (chance is 1/6: random
  # 32 px features of this tiny network hardly see shapes), trained
  # 0.23/0.32/0.33; means over 5 seeds of the same 240 test images. The
  # margin asked, 0.05, is 12 test images: far above what float rounding
  # on another CPU could flip, far below the measured 0.10.
  for k in (5, 10):
    assert trained[f"synth_shapes_{k}shot"] > (
        random[f"synth_shapes_{k}shot"] + 0.05), results


def test_pool_keeps_the_first_examples_of_each_class(data_dir):
  """Features come from the split in order; the pool is capped per class."""
  model = predict.LoadedModel(backbones()["random"], _metadata(step=0))
  evaluator = _evaluator(data_dir, shots=(1,), pool_per_class=3)
  features_fn = lambda images: model.forward_sharded(images)[1]
  x, y, num_classes = evaluator._features(
      features_fn, evaluator.tasks[0], "train", helpers.IMAGE_SIZE, pool=True)
  labels = np.array([int(ex["label"]) for ex in tfds.load(
      "synth_shapes", split="train", data_dir=data_dir)])
  first = np.sort(np.concatenate([np.flatnonzero(labels == c)[:3]
                                  for c in range(num_classes)]))
  np.testing.assert_array_equal(y, labels[first])
  assert x.shape == (len(first), resnet.scaled_features(2048, WIDTH))


def test_cli_on_a_checkpoint(data_dir, tmp_path, capsys):
  checkpoint = store.save_inference_checkpoint(
      tmp_path / "ckpt", backbones()["trained"], _metadata(step=300))
  want = fewshot.evaluate_checkpoint(
      predict.LoadedModel.load(checkpoint),
      _evaluator(data_dir, shots=(5,), seeds=(0, 1)))
  out = tmp_path / "fewshot.json"
  assert cli_main(["fewshot", "--checkpoint", str(checkpoint), "--dataset",
                   "synth_shapes,train,test", "--data-dir", data_dir,
                   "--shots", "5", "--seeds", "0", "1", "--batch-size", "16",
                   "--pool-per-class", "10", "--num-test-examples", "-1",
                   "--out", str(out), "--no-progress"]) == 0
  written = json.loads(out.read_text())
  assert written["accuracy"] == want["accuracy"]
  assert written["step"] == 300 and written["image_size"] == helpers.IMAGE_SIZE
  assert json.loads(capsys.readouterr().out)["accuracy"] == want["accuracy"]


def test_cli_names_the_missing_dataset(tmp_path, capsys):
  checkpoint = store.save_inference_checkpoint(
      tmp_path / "ckpt", backbones()["random"], _metadata(step=0))
  assert cli_main(["fewshot", "--checkpoint", str(checkpoint), "--dataset",
                   "cifar100", "--data-dir", str(tmp_path / "none")]) == 1
  assert "tfds build cifar100" in capsys.readouterr().err


@pytest.mark.slow  # Two JAX processes start and compile.
def test_two_processes_give_the_one_process_accuracies(data_dir, tmp_path):
  """2 processes x 2 CPU devices (gloo): each reads its shard, they stop
  filling the pool together and gather; same accuracies as one process."""
  checkpoint = store.save_inference_checkpoint(
      tmp_path / "ckpt", backbones_random(), _metadata(step=0))
  want = fewshot.evaluate_checkpoint(
      predict.LoadedModel.load(checkpoint), fewshot.FewshotEvaluator(
          [fewshot.Task("synth_shapes", "train", "test")], data_dir=data_dir,
          **helpers.MULTIHOST))["accuracy"]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workers = [subprocess.Popen(
      [sys.executable, helpers.__file__, str(checkpoint), data_dir,
       str(tmp_path / f"out{i}.json"), str(i), "2", str(port)], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  for worker in workers:
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0, output[-3000:]
  for i in range(2):
    assert json.loads((tmp_path / f"out{i}.json").read_text()) == want


@functools.cache
def backbones_random() -> dict:
  model = resnet.create_model(14, len(synthetic.SHAPES),
                              width_multiplier=WIDTH)
  return jax.tree.map(np.asarray, dict(jax.jit(
      functools.partial(model.init, train=False))(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))


def test_cli_out_never_goes_into_the_checkpoint(tmp_path, capsys):
  """--out inside the checkpoint: refused before anything is loaded."""
  out = tmp_path / "fewshot.json"
  assert cli_main(["fewshot", "--checkpoint", str(tmp_path), "--dataset",
                   "cifar100", "--out", str(out), "--no-progress"]) == 1
  assert capsys.readouterr().err == (
      f"mlimages fewshot: error: --out {out} is inside the input "
      f"--checkpoint {tmp_path}: refusing to write over an input\n")
