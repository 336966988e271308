"""Export to a TensorFlow SavedModel (jax2tf) with a uint8 serving signature.

``serving_default`` takes uint8 images ``[batch, height, width, 3]`` (any
batch and size: the shapes are polymorphic; the checkpoint's
``image_size`` is what it was trained for) and returns ``probabilities``
(sigmoid for multi-label checkpoints, softmax for single-label ones),
``features`` (the pooled feature vector) and ``logits``. Normalisation
(x * 2/255 - 1) is inside the graph, so a client sends raw pixels.

The network is serialised as StableHLO by jax2tf; the weights are TF
variables (not constants folded into the graph), so a ResNet-101 export
stays a normal-sized SavedModel. Loading needs only TensorFlow::

  serve = tf.saved_model.load(DIR).signatures["serving_default"]
  out = serve(images=tf.constant(uint8_images))

``classes.json`` (ids and names in output order) and ``export.json``
(origin, image size, label mode) sit next to ``saved_model.pb``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import tensorflow as tf
from jax.experimental import jax2tf

from mlimages_jax import fileio
from mlimages_jax.export import bundle
from mlimages_jax.inputs import preprocessing
from mlimages_jax.models import resnet

FORMAT = "mlimages-jax-savedmodel"
SIGNATURE = "serving_default"
EXPORT_FILE = "export.json"


def serving_function(model: resnet.ResNet, label_mode: str):
  """(variables, uint8 images) -> dict of probabilities, features, logits."""
  def serve(variables: Mapping[str, Any], images: jnp.ndarray
            ) -> dict[str, jnp.ndarray]:
    logits, features = model.apply(variables, preprocessing.normalize(images),
                                   train=False)
    probabilities = (jax.nn.sigmoid(logits) if label_mode == "multi"
                     else jax.nn.softmax(logits))
    return {"probabilities": probabilities, "features": features,
            "logits": logits}
  return serve


def export(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
           *, overwrite: bool = False) -> pathlib.Path:
  """Writes the SavedModel of `checkpoint` to `out` (atomically)."""
  variables, metadata, model = bundle.load_checked(checkpoint, out)
  converted = jax2tf.convert(
      serving_function(model, metadata["label_mode"]),
      polymorphic_shapes=[None, "(b, h, w, 3)"], with_gradient=False)
  module = tf.Module()
  module.variables_ = tf.nest.map_structure(
      lambda x: tf.Variable(x, trainable=False), dict(variables))

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def serve(images):
    return converted(module.variables_, images)

  module.serve = serve
  with fileio.atomic_directory(out, marker=EXPORT_FILE,
                               overwrite=overwrite) as tmp:
    tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: serve})
    with open(tmp / EXPORT_FILE, "w", encoding="utf-8") as f:
      json.dump({**bundle.describe(metadata, os.fspath(checkpoint), FORMAT),
                 "signature": SIGNATURE,
                 "input": "uint8 images [batch, height, width, 3]",
                 "outputs": ["probabilities", "features", "logits"]},
                f, indent=1)
    bundle.write_classes(tmp, metadata)
  return pathlib.Path(out).resolve()
