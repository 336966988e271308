"""Tests of mlimages_jax.export.pytorch and `mlimages export --format pytorch`.

The exported module is loaded the way a PyTorch user would (from the export
directory, by file name), in a separate interpreter in which importing JAX,
TensorFlow or mlimages_jax fails, and must give our logits and features on
random images and on the 4 real photos, for a tiny ResNet-14 and a
ResNet-101.
"""

from __future__ import annotations

import json

import pytest

import export_helpers as helpers
from mlimages_jax.models import resnet

pytest.importorskip("torch")  # Test-only (CPU build), for the subprocess.
from mlimages_jax.export import pytorch  # noqa: E402


# Plain PyTorch: the exported module on saved inputs, as a user runs it.
_SERVE = """
sys.modules['tensorflow'] = None
import numpy as np
import torch
sys.path.insert(0, sys.argv[3])
import mlimages_resnet
net = mlimages_resnet.load(sys.argv[3])
outputs = {}
with np.load(sys.argv[1]) as inputs, torch.no_grad():
  for kind, images in inputs.items():
    logits, features = net(mlimages_resnet.normalize(torch.from_numpy(images)))
    assert logits.dtype == features.dtype == torch.float32
    outputs[f'{kind}/logits'], outputs[f'{kind}/features'] = (
        logits.numpy(), features.numpy())
np.savez(sys.argv[2], **outputs)
"""


@pytest.fixture(scope="module", params=sorted(helpers.NETWORKS))
def exported(request, tmp_path_factory):
  """(network name, export dir, our inputs, the exported module's outputs)."""
  root = tmp_path_factory.mktemp(request.param)
  directory = helpers.export(request.param, root, "pytorch")
  inputs = helpers.inputs(request.param)
  return request.param, directory, inputs, helpers.run_without_jax(
      _SERVE, inputs, root, str(directory))


def test_same_logits_and_features_as_our_model(exported):
  name, _, inputs, outputs = exported
  for kind, images in inputs.items():
    for key, want in zip(("logits", "features"),
                         helpers.reference(name, images)):
      got = outputs[f"{kind}/{key}"]
      assert got.shape == want.shape
      error = helpers.relative_error(got, want)
      assert error < helpers.RTOL, (name, kind, key, error)


def test_export_has_classes_and_config(exported):
  name, directory, _, _ = exported
  depth, width, classes, size = helpers.NETWORKS[name]
  assert json.loads((directory / "classes.json").read_text()) == {
      "ids": [f"n{i:08d}" for i in range(classes)],
      "names": [f"class {i}" for i in range(classes)]}
  config = json.loads((directory / pytorch.CONFIG_FILE).read_text())
  assert config["image_size"] == size
  assert config["architecture"]["stage_sizes"] == list(
      resnet.STAGE_SIZES[depth])
  assert config["architecture"]["stage_channels"][-1] == 2048 * width
  assert config["probabilities"] == "sigmoid"
