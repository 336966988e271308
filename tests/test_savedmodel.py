"""Tests of mlimages_jax.export.savedmodel and `mlimages export --format
savedmodel`.

The SavedModel is served in a separate interpreter in which importing JAX
or mlimages_jax fails, so the test proves it loads with TensorFlow alone;
its probabilities and features must match our network's on random images
and on the 4 real photos, for a tiny ResNet-14 and a ResNet-101.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import export_helpers as helpers
from mlimages_jax.checkpoints import store
from mlimages_jax.export import savedmodel

# Plain TensorFlow: serve the exported signature on saved inputs.
_SERVE = """
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[3]).signatures['serving_default']
with np.load(sys.argv[1]) as inputs:
  outputs = {k: {n: t.numpy() for n, t in serve(images=tf.constant(v)).items()}
             for k, v in inputs.items()}
np.savez(sys.argv[2], **{f'{k}/{n}': v for k, o in outputs.items()
                         for n, v in o.items()})
"""


@pytest.fixture(scope="module", params=sorted(helpers.NETWORKS))
def served(request, tmp_path_factory):
  """(network name, export dir, our inputs, the SavedModel's outputs)."""
  root = tmp_path_factory.mktemp(request.param)
  exported = helpers.export(request.param, root, "savedmodel")
  inputs = helpers.inputs(request.param)
  return request.param, exported, inputs, helpers.run_without_jax(
      _SERVE, inputs, root, str(exported))


def test_same_probabilities_and_features_as_our_model(served):
  name, _, inputs, outputs = served
  for kind, images in inputs.items():
    logits, features = helpers.reference(name, images)
    probabilities = 1.0 / (1.0 + np.exp(-logits))  # Multi-label: sigmoid.
    for key, want in (("probabilities", probabilities),
                      ("features", features), ("logits", logits)):
      got = outputs[f"{kind}/{key}"]
      assert got.dtype == np.float32 and got.shape == want.shape
      error = helpers.relative_error(got, want)
      assert error < helpers.RTOL, (name, kind, key, error)


def test_export_describes_classes_and_signature(served):
  name, directory, _, _ = served
  classes = helpers.NETWORKS[name][2]
  assert json.loads((directory / "classes.json").read_text())["ids"] == [
      f"n{i:08d}" for i in range(classes)]
  info = json.loads((directory / savedmodel.EXPORT_FILE).read_text())
  assert info["signature"] == "serving_default"
  assert info["probabilities"] == "sigmoid"


def test_softmax_for_single_label_checkpoints(tmp_path):
  """Single-label checkpoints serve softmax probabilities (rows sum to 1)."""
  _, variables = helpers.network("tiny")
  depth, width, classes, size = helpers.NETWORKS["tiny"]
  checkpoint = store.save_inference_checkpoint(
      tmp_path / "ckpt", variables, store.make_metadata(
          depth=depth, num_classes=classes, width_multiplier=width,
          image_size=size, label_mode="single", class_ids=list("abcdefg"),
          class_names=list("abcdefg")))
  import tensorflow as tf
  out = savedmodel.export(checkpoint, tmp_path / "sm")
  serve = tf.saved_model.load(str(out)).signatures["serving_default"]
  images = helpers.inputs("tiny")["random"]
  got = serve(images=tf.constant(images))["probabilities"].numpy()
  logits, _ = helpers.reference("tiny", images)
  want = np.exp(logits - logits.max(1, keepdims=True))
  want /= want.sum(1, keepdims=True)
  assert helpers.relative_error(got, want) < helpers.RTOL
