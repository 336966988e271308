"""Imports the original project's released TF1 checkpoints into our format.

The released checkpoints (``ckpt-resnet101-mlimages``, 11,166 sigmoid classes,
and ``ckpt-resnet101-mlimages-imagenet``, 1000 softmax classes) were written by
the original ``models/resnet.py``: ``tf.layers`` inside ``tf.variable_scope``
blocks, so every variable name is ``<scope>/conv2d/kernel``,
``<scope>/batch_normalization/{gamma,beta,moving_mean,moving_variance}`` or
``logits/dense/{kernel,bias}``. Our Flax module names mirror those scopes, so
the mapping is one to one (``TF_NAME_OF``); kernels are HWIO in both.

The model's depth, width and class count are inferred from the checkpoint;
every variable the Flax model expects must be present with the right shape and
every other variable must be known training state (``global_step``, momentum
slots, the loss counters), or the conversion fails listing all problems and
writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mlimages_jax import fileio
from mlimages_jax.data import hierarchy as hierarchy_lib

# Flax BN variable -> the tf.layers.batch_normalization variable.
_BN_TF_NAMES = {("params", "scale"): "gamma", ("params", "bias"): "beta",
                ("batch_stats", "mean"): "moving_mean",
                ("batch_stats", "var"): "moving_variance"}
_BLOCK_RE = re.compile(r"^stages_(\d+)_block_(\d+)/")
# Variables a training run saves next to the weights: the step, the momentum
# slots of every variable and the adaptive loss's unnamed counter variables.
_TRAINING_STATE_RE = re.compile(r"^(global_step|Variable(_\d+)?|.*/Momentum)$")
STEM_TF_NAME = "init/init_conv/conv2d/kernel"
LOGITS_BIAS_TF_NAME = "logits/dense/bias"
DEFAULT_IMAGE_SIZE = 224


class ConversionError(ValueError):
  """The TF checkpoint does not hold the network we can convert."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  depth: int
  num_classes: int
  width_multiplier: float


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  path: str
  spec: ModelSpec
  converted: int  # Number of variables copied.
  ignored: tuple[str, ...]  # Training-state variables left behind.


def tf_name_of(collection: str, path: Sequence[str]) -> str:
  """The TF variable name of a Flax variable ``(collection, path)``."""
  module, leaf = path[:-1], path[-1]
  if module == ("logits",):
    return f"logits/dense/{leaf}"
  if module[-1].endswith("_bn"):
    scope = "global_pool/bn" if module == ("global_pool_bn",) else "/".join(
        module)
    return f"{scope}/batch_normalization/{_BN_TF_NAMES[collection, leaf]}"
  if module == ("init_conv",):
    return STEM_TF_NAME
  return "/".join(module) + "/conv2d/kernel"


def _flax_leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flax_leaves(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _set_leaf(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def read_tf_checkpoint(prefix: str) -> dict[str, np.ndarray]:
  """All variables of a TF checkpoint (``.index``/``.data-*`` prefix)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    reader = tf.train.load_checkpoint(prefix)
  except (ValueError, tf.errors.OpError) as e:
    raise ConversionError(
        f"{prefix}: not a readable TF checkpoint prefix (expected "
        f"{prefix}.index and {prefix}.data-*): {e}") from None
  return {name: np.asarray(reader.get_tensor(name))
          for name in reader.get_variable_to_shape_map()}


def infer_spec(tf_shapes: Mapping[str, Sequence[int]], *,
               depth: int | None = None,
               num_classes: int | None = None) -> ModelSpec:
  """Depth from the block scopes, width from the stem, classes from the head."""
  from mlimages_jax.models import resnet  # pylint: disable=g-import-not-at-top

  missing = [n for n in (STEM_TF_NAME, LOGITS_BIAS_TF_NAME)
             if n not in tf_shapes]
  if missing:
    raise ConversionError(
        f"not an ML-Images ResNet checkpoint: no {', '.join(missing)} "
        f"(it has {len(tf_shapes)} variables, e.g. "
        f"{sorted(tf_shapes)[:5]})")
  blocks: dict[int, int] = {}
  for name in tf_shapes:
    match = _BLOCK_RE.match(name)
    if match:
      stage, block = int(match[1]), int(match[2])
      blocks[stage] = max(blocks.get(stage, 0), block + 1)
  stage_sizes = tuple(blocks.get(i, 0) for i in range(max(blocks, default=0)
                                                      + 1))
  try:
    inferred_depth = resnet.depth_of(stage_sizes)
  except ValueError as e:
    raise ConversionError(f"cannot infer the depth: {e}") from None
  if depth is not None and depth != inferred_depth:
    raise ConversionError(f"--depth {depth} given, but the checkpoint holds "
                          f"a ResNet-{inferred_depth} (blocks {stage_sizes})")
  inferred_classes = int(tf_shapes[LOGITS_BIAS_TF_NAME][0])
  if num_classes is not None and num_classes != inferred_classes:
    raise ConversionError(f"--num-classes {num_classes} given, but the "
                          f"checkpoint has {inferred_classes} logits")
  stem_features = int(tf_shapes[STEM_TF_NAME][-1])
  return ModelSpec(depth=inferred_depth, num_classes=inferred_classes,
                   width_multiplier=stem_features / resnet.STEM_FEATURES)


def convert_variables(tf_vars: Mapping[str, np.ndarray], *,
                      depth: int | None = None,
                      num_classes: int | None = None
                      ) -> tuple[dict[str, Any], ModelSpec, tuple[str, ...]]:
  """Maps TF variables onto the Flax ResNet's ``{"params", "batch_stats"}``.

  Returns the variables (float32 NumPy), the model spec and the names of the
  training-state variables that were ignored. Raises ConversionError listing
  every missing, unexpected and mis-shaped variable at once.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mlimages_jax.models import resnet  # pylint: disable=g-import-not-at-top

  spec = infer_spec({k: v.shape for k, v in tf_vars.items()}, depth=depth,
                    num_classes=num_classes)
  model = resnet.create_model(spec.depth, spec.num_classes,
                              width_multiplier=spec.width_multiplier)
  expected = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))

  variables: dict[str, Any] = {}
  missing, wrong_shape, used = [], [], set()
  for collection in ("params", "batch_stats"):
    for path, abstract in _flax_leaves(expected[collection]):
      name = tf_name_of(collection, path)
      if name not in tf_vars:
        missing.append(name)
        continue
      used.add(name)
      value = tf_vars[name]
      if tuple(value.shape) != tuple(abstract.shape):
        wrong_shape.append(f"{name}: checkpoint {tuple(value.shape)}, "
                           f"model {tuple(abstract.shape)}")
        continue
      _set_leaf(variables.setdefault(collection, {}), path,
                np.asarray(value, np.float32))
  rest = sorted(set(tf_vars) - used)
  ignored = tuple(n for n in rest if _TRAINING_STATE_RE.match(n))
  unexpected = [n for n in rest if not _TRAINING_STATE_RE.match(n)]
  if missing or unexpected or wrong_shape:
    lines = [f"the checkpoint does not match a ResNet-{spec.depth} "
             f"(width {spec.width_multiplier:g}, {spec.num_classes} classes):"]
    for title, names in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong_shape)):
      if names:
        lines.append(f"  {len(names)} {title}:")
        lines.extend(f"    {n}" for n in names)
    raise ConversionError("\n".join(lines))
  return variables, spec, ignored


def read_class_dictionary(path: str | os.PathLike, num_classes: int
                          ) -> tuple[list[str], list[str]]:
  """Class ids and names from one of the original dictionaries.

  Accepts ``dictionary_and_semantic_hierarchy.txt`` (ids are wnids) or
  ``imagenet2012_dictionary.txt`` (``index<TAB>name words``; ids are the
  ILSVRC-2012 wnids in the order TFDS ``imagenet2012`` labels use, which is the
  original's index order, so converted models evaluate on that dataset).
  """
  path = os.fspath(path)
  with fileio.open_text(path, lambda source, lineno, message: (
      ConversionError(f"{source}:{lineno}: {message}"))) as f:
    lines = list(f)
  first = lines[0].rstrip("\n") if lines else ""
  if tuple(c.strip() for c in first.split("\t")) == hierarchy_lib.HEADER:
    tree = hierarchy_lib.Hierarchy.from_file(path)
    ids, names = list(tree.wnids), list(tree.names)
  else:
    names = []
    for lineno, line in enumerate(lines, start=1):
      fields = line.split()
      if not fields:
        continue
      if fields[0] != str(len(names)) or len(fields) < 2:
        raise ConversionError(
            f"{path}:{lineno}: expected '{len(names)}<TAB>class name', got "
            f"{line.strip()[:80]!r}")
      names.append(" ".join(fields[1:]))
    ids = (imagenet2012_wnids() if len(names) == 1000
           else [str(i) for i in range(len(names))])
  if len(ids) != num_classes:
    raise ConversionError(f"{path}: {len(ids)} classes, but the checkpoint "
                          f"has {num_classes}")
  return ids, names


def imagenet2012_wnids() -> list[str]:
  """The 1000 ILSVRC-2012 wnids in TFDS ``imagenet2012`` label order."""
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  with open(imagenet_common.label_names_file(), encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def default_classes(num_classes: int) -> tuple[list[str], list[str]]:
  """Class ids/names without a dictionary: ImageNet wnids or bare indices."""
  if num_classes == 1000:
    ids = imagenet2012_wnids()
    return ids, list(ids)
  ids = [str(i) for i in range(num_classes)]
  return ids, list(ids)


def convert_checkpoint(prefix: str, out: str | os.PathLike, *,
                       depth: int | None = None,
                       num_classes: int | None = None,
                       dictionary: str | os.PathLike | None = None,
                       image_size: int = DEFAULT_IMAGE_SIZE,
                       label_mode: str | None = None,
                       overwrite: bool = False) -> ConversionResult:
  """Converts a TF checkpoint to an Orbax inference checkpoint at ``out``.

  ``label_mode`` defaults to "single" for 1000 classes (the ImageNet
  fine-tuned softmax model) and "multi" otherwise. Everything is validated
  before anything is written (`out` may not overlap the inputs, and
  ``overwrite`` replaces only an inference checkpoint), and the write itself
  is atomic.
  """
  from mlimages_jax.checkpoints import store  # pylint: disable=g-import-not-at-top

  fileio.check_disjoint({"TF_CKPT_PREFIX": f"{prefix}.index",
                         "--dictionary": dictionary}, {"--out": out})
  if fileio.as_path(out).exists() and not overwrite:
    raise ConversionError(f"{out} exists (use --overwrite to replace it)")
  tf_vars = read_tf_checkpoint(prefix)
  variables, spec, ignored = convert_variables(
      tf_vars, depth=depth, num_classes=num_classes)
  if dictionary is not None:
    ids, names = read_class_dictionary(dictionary, spec.num_classes)
  else:
    ids, names = default_classes(spec.num_classes)
  if label_mode is None:
    label_mode = "single" if spec.num_classes == 1000 else "multi"
  metadata = store.make_metadata(
      depth=spec.depth, num_classes=spec.num_classes,
      width_multiplier=spec.width_multiplier, image_size=image_size,
      label_mode=label_mode, class_ids=ids, class_names=names, step=0)
  path = store.save_inference_checkpoint(out, variables, metadata,
                                               overwrite=overwrite)
  converted = sum(1 for c in variables.values() for _ in _flax_leaves(c))
  return ConversionResult(path=str(path), spec=spec, converted=converted,
                          ignored=ignored)
