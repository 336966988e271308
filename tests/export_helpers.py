"""Checkpoints and reference outputs shared by the export tests.

Two networks: a tiny ResNet-14 and a full-width ResNet-101 (the real
topology: 33 blocks, 2048 features) with random weights and random BN
statistics, so every parameter and statistic changes the outputs. The
ResNet-101 runs at 64 px on 2 images at a time to keep the tests cheap;
its weights come from NumPy (no JAX init to compile).

Inputs: random uint8 images and the 4 real photos of the original project
(MLIMAGES_SHARED_DIR), preprocessed like `mlimages classify` does.
"""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from conftest import shared_ml_images_dir
from mlimages_jax.checkpoints import store
from mlimages_jax.cli import main as cli_main
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet

# (depth, width, classes, image size) of each exported network.
NETWORKS = {"tiny": (14, 0.0625, 7, 32), "resnet101": (101, 1.0, 10, 64)}

# Relative error bound of the issue: max |ours - theirs| / max |ours| per
# output. float32 convolutions in XLA, oneDNN (torch, TF) sum in different
# orders: ~1e-7 relative per layer, ~1e-6 after ResNet-101's 100 layers
# (measured at most 1.1e-6); a wrong layout, padding or BN term gives > 1e-2.
RTOL = 1e-4


# Prepended to a script run by `run_without_jax`.
_BLOCK_JAX = ("import sys\n"
              "for name in ('jax', 'jaxlib', 'flax', 'mlimages_jax'):\n"
              "  sys.modules[name] = None  # Importing it now fails.\n")


def run_without_jax(script: str, inputs: dict[str, np.ndarray],
                    root: pathlib.Path, *args: str) -> dict[str, np.ndarray]:
  """Runs `script` in a fresh interpreter in which importing JAX or this
  package fails, as an export's user would: argv[1] is an .npz of `inputs`,
  argv[2] the .npz it must write (returned), then `args`. So an export
  that needs us, or a comparison that JAX's loaded libraries would sway,
  cannot pass."""
  np.savez(root / "inputs.npz", **inputs)
  subprocess.run([sys.executable, "-c", _BLOCK_JAX + script,
                  str(root / "inputs.npz"), str(root / "outputs.npz"), *args],
                 check=True)
  with np.load(root / "outputs.npz") as outputs:
    return dict(outputs)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


@functools.cache
def network(name: str) -> tuple[resnet.ResNet, dict]:
  """The network and random variables (NumPy, float32)."""
  depth, width, classes, _ = NETWORKS[name]
  model = resnet.create_model(depth, classes, width_multiplier=width)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  rng = np.random.default_rng(depth)

  def draw(path, leaf) -> np.ndarray:
    key = path[-1].key
    if key == "kernel":  # He-like scale keeps activations O(1).
      fan_in = np.prod(leaf.shape[:-1])
      value = rng.normal(0, np.sqrt(1.0 / fan_in), leaf.shape)
    elif key in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # Biases, BN offsets and means.
      value = rng.normal(0, 0.1, leaf.shape)
    return value.astype(np.float32)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def save_checkpoint(name: str, path: pathlib.Path) -> pathlib.Path:
  depth, width, classes, size = NETWORKS[name]
  _, variables = network(name)
  metadata = store.make_metadata(
      depth=depth, num_classes=classes, width_multiplier=width,
      image_size=size, label_mode="multi",
      class_ids=[f"n{i:08d}" for i in range(classes)],
      class_names=[f"class {i}" for i in range(classes)], step=5)
  return store.save_inference_checkpoint(path, variables, metadata)


def export(name: str, root: pathlib.Path, export_format: str) -> pathlib.Path:
  """Saves network `name` under `root` and exports it with the real CLI."""
  checkpoint = save_checkpoint(name, root / "ckpt")
  out = root / export_format
  assert cli_main(["export", "--checkpoint", str(checkpoint), "--format",
                   export_format, "--out", str(out)]) == 0
  return out


def inputs(name: str) -> dict[str, np.ndarray]:
  """uint8 [N, S, S, 3] batches: "random" and, if present, "photos"."""
  size = NETWORKS[name][3]
  batches = {"random": np.random.default_rng(1).integers(
      0, 256, (4, size, size, 3), np.uint8)}  # The photos' shape.
  photos = sorted((shared_ml_images_dir() / "images").glob("*.jpg"))
  if photos:
    config = preprocessing.PreprocessConfig.for_mode("eval")
    batches["photos"] = np.stack([preprocessing.eval_image(
        tf.io.read_file(str(p)), image_size=size, config=config).numpy()
                                  for p in photos])
  return batches


@functools.cache
def _apply(name: str):
  model, _ = network(name)
  return jax.jit(lambda v, x: model.apply(v, preprocessing.normalize(x),
                                          train=False))


def reference(name: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Our network's (logits, features), 2 images per call."""
  _, variables = network(name)
  outputs = [_apply(name)(variables, images[i:i + 2])
             for i in range(0, len(images), 2)]
  return tuple(np.concatenate([np.asarray(o[k]) for o in outputs])
               for k in (0, 1))
