"""Tests of mlimages_jax.export.pytorch and `mlimages export --format pytorch`.

The exported module is loaded the way a PyTorch user would (from the export
directory, by file name) and must give our logits and features on random
images and on the 4 real photos, for a tiny ResNet-14 and a ResNet-101.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import export_helpers as helpers
from mlimages_jax.models import resnet

torch = pytest.importorskip("torch")  # Test-only (CPU build).
from mlimages_jax.export import pytorch  # noqa: E402


def _import_exported(directory: pathlib.Path):
  spec = importlib.util.spec_from_file_location(
      f"exported_{directory.name}", directory / pytorch.MODULE_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module", params=sorted(helpers.NETWORKS))
def exported(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(request.param)
  return request.param, helpers.export(request.param, root, "pytorch")


def test_same_logits_and_features_as_our_model(exported):
  name, directory = exported
  module = _import_exported(directory)
  net = module.load(directory)
  for kind, images in helpers.inputs(name).items():
    want_logits, want_features = helpers.reference(name, images)
    with torch.no_grad():
      logits, features = net(module.normalize(torch.from_numpy(images)))
    for got, want in ((logits, want_logits), (features, want_features)):
      assert got.dtype == torch.float32
      error = helpers.relative_error(got.numpy(), want)
      assert error < helpers.RTOL, (name, kind, error)


def test_export_has_classes_and_config(exported):
  name, directory = exported
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


def test_module_imports_neither_jax_nor_this_package(exported):
  """Run in a fresh interpreter in which importing JAX or us would fail."""
  _, directory = exported
  code = ("import sys\n"
          "for m in ('jax', 'jaxlib', 'flax', 'mlimages_jax', 'tensorflow'):\n"
          "  sys.modules[m] = None\n"
          "import torch, mlimages_resnet\n"
          "net = mlimages_resnet.load('.')\n"
          "x = torch.zeros(1, 3, 32, 32)\n"
          "print(tuple(t.shape[1] for t in net(x)))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=directory,
                       capture_output=True, text=True, check=True).stdout
  config = json.loads((directory / pytorch.CONFIG_FILE).read_text())
  arch = config["architecture"]
  assert out.strip() == str((arch["num_classes"], arch["stage_channels"][-1]))
