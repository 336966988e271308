"""Export to PyTorch: safetensors weights + a self-contained module file.

The export directory holds

- ``model.safetensors``: the weights under the state-dict names of
  ``mlimages_resnet.MLImagesResNet`` (flax ``a/b/kernel`` -> torch
  ``a.b.weight``; convolution kernels HWIO -> OIHW, the dense kernel
  transposed, BN scale/bias/mean/var -> weight/bias/running_mean/running_var);
- ``mlimages_resnet.py``: a copy of ``torch_resnet.py`` (imports only torch);
- ``config.json``: the architecture and the input convention;
- ``classes.json``: the class ids and names, in logit order.

The conversion itself needs only NumPy and safetensors, not torch.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import save

from mlimages_jax import fileio
from mlimages_jax.export import bundle

FORMAT = "mlimages-jax-pytorch"
# The module shipped with the export; read as a file, never imported here
# (the exporter must not need torch). Its WEIGHTS_FILE / CONFIG_FILE are these.
TORCH_MODULE = pathlib.Path(__file__).with_name("torch_resnet.py")
MODULE_FILE = "mlimages_resnet.py"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean",
             "var": "running_var"}


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
          ) -> dict[tuple[str, ...], np.ndarray]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flat(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = np.asarray(value)
  return flat


def torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax ``{"params", "batch_stats"}`` -> PyTorch state dict (NumPy)."""
  state = {}
  for path, value in _flat(variables["params"]).items():
    module, leaf = ".".join(path[:-1]), path[-1]
    if leaf == "kernel" and value.ndim == 4:
      state[f"{module}.weight"] = value.transpose(3, 2, 0, 1)
    elif leaf == "kernel":
      state[f"{module}.weight"] = value.T
    elif module == "logits":
      state[f"{module}.bias"] = value
    else:  # A BatchNorm's scale or bias.
      state[f"{module}.{_BN_NAMES[leaf]}"] = value
      state[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
  for path, value in _flat(variables["batch_stats"]).items():
    state[f"{'.'.join(path[:-1])}.{_BN_NAMES[path[-1]]}"] = value
  return {k: np.ascontiguousarray(v, np.int64 if v.dtype == np.int64
                                  else np.float32)
          for k, v in state.items()}


def export(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
           *, overwrite: bool = False) -> pathlib.Path:
  """Writes the PyTorch export of `checkpoint` to `out` (atomically)."""
  variables, metadata, model = bundle.load_checked(checkpoint, out)
  config = {**bundle.describe(metadata, os.fspath(checkpoint), FORMAT),
            "architecture": bundle.architecture(model),
            "input": "float32 NCHW, uint8 pixels x 2/255 - 1 "
                     "(mlimages_resnet.normalize)",
            "outputs": ["logits", "features"]}
  with fileio.atomic_directory(out, marker=MODULE_FILE,
                               overwrite=overwrite) as tmp:
    # safetensors' save_file creates a private 0600 file: write its bytes.
    (tmp / WEIGHTS_FILE).write_bytes(
        save(torch_state_dict(variables), metadata={"format": FORMAT}))
    shutil.copyfile(TORCH_MODULE, tmp / MODULE_FILE)
    with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=1)
    bundle.write_classes(tmp, metadata)
  return pathlib.Path(out).resolve()
