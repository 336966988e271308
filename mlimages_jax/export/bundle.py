"""What every export shares: a checked checkpoint and an atomic directory.

An export is only as trustworthy as the weights it copies: the checkpoint's
variables are checked against the network its metadata describes (depth,
width, classes) before anything is written, so a mismatched checkpoint is
refused with the list of differences. The export directory appears whole
or not at all (written in a temporary directory next to it, then renamed);
it may not overlap the checkpoint, and ``--overwrite`` replaces only an
earlier export of the same format.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from mlimages_jax import fileio
from mlimages_jax.checkpoints import store
from mlimages_jax.inference import predict
from mlimages_jax.models import resnet

CLASSES_FILE = "classes.json"


def load_checked(checkpoint: str | os.PathLike[str],
                 out: str | os.PathLike[str]
                 ) -> tuple[dict[str, Any], dict[str, Any], resnet.ResNet]:
  """(variables, metadata, network) of a checkpoint whose weights fit it.

  Raises OverlapError if the export directory `out` would be, hold or sit
  inside the checkpoint, and CheckpointError naming the checkpoint and every
  missing, unexpected or misshaped array.
  """
  fileio.check_disjoint({"--checkpoint": checkpoint}, {"--out": out})
  source = os.path.abspath(checkpoint)
  variables, metadata = store.load_for_inference(checkpoint)
  spec = metadata["model"]
  model = resnet.create_model(int(spec["depth"]), int(spec["num_classes"]),
                              width_multiplier=float(spec["width_multiplier"]))
  predict.check_variables(model, variables, source)
  return variables, metadata, model


def architecture(model: resnet.ResNet) -> dict[str, Any]:
  """The network's shape, explicit (channel counts after the width)."""
  width = model.width_multiplier
  return {
      "num_classes": model.num_classes,
      "stage_sizes": list(model.stage_sizes),
      "stem_channels": resnet.scaled_features(resnet.STEM_FEATURES, width),
      "stage_channels": [resnet.scaled_features(f, width)
                         for f in resnet.STAGE_FEATURES],
      "bn_epsilon": model.bn_epsilon,
  }


def describe(metadata: Mapping[str, Any], checkpoint: str,
             export_format: str) -> dict[str, Any]:
  """What an export records about its origin and its input convention."""
  return {
      "format": export_format,
      "checkpoint": os.path.abspath(checkpoint),
      "step": metadata["step"],
      "model": metadata["model"],
      "image_size": metadata["image_size"],
      "label_mode": metadata["label_mode"],
      "probabilities": ("sigmoid" if metadata["label_mode"] == "multi"
                        else "softmax"),
  }


def write_classes(directory: pathlib.Path,
                  metadata: Mapping[str, Any]) -> None:
  with open(directory / CLASSES_FILE, "w", encoding="utf-8") as f:
    json.dump({"ids": metadata["classes"]["ids"],
               "names": metadata["classes"]["names"]}, f, indent=1)
