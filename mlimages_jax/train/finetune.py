"""Fine-tuning (ML_IMAGES.md §8): a pre-trained backbone and frozen blocks.

``init_checkpoint`` restores every variable but the head (`HEAD`) from a
pre-training run or a converted checkpoint; ``freeze_blocks=k`` freezes the
stem and the first k stages ("FixBlock2" is k=2): their parameters take no
gradient step and no weight decay. Their BN layers normalise with batch
statistics like the others, and ``frozen_blocks_batch_stats`` says what
happens to their moving averages: "update" (the original's FixBlock2, whose
frozen BN layers stay in training mode with their UPDATE_OPS run) or "keep"
(discarded: the frozen blocks stay bit-identical to the checkpoint). The
optimizer and the train step ask `is_frozen` which variables those are.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import flax
import ml_collections

from mlimages_jax.checkpoints import store
from mlimages_jax.train.state import TrainState

HEAD = "logits"  # The module that fine-tuning re-initialises.
STEM = "init_conv"
# Values of config.frozen_blocks_batch_stats (see the module docstring).
FROZEN_BLOCKS_BATCH_STATS = ("update", "keep")


def is_frozen(path: tuple[str, ...], freeze_blocks: int) -> bool:
  """Whether a variable (by its path) is in the stem or a frozen stage."""
  if not freeze_blocks:
    return False
  top = path[0]
  return top == STEM or any(top.startswith(f"stages_{i}_")
                            for i in range(freeze_blocks))


def freeze_labels(params: Any, freeze_blocks: int) -> Any:
  """"frozen" / "trainable" for every parameter (optax.multi_transform)."""
  return flax.traverse_util.path_aware_map(
      lambda path, _: ("frozen" if is_frozen(path, freeze_blocks)
                       else "trainable"), params)


def load_backbone(path: str, config: ml_collections.ConfigDict,
                  abstract_variables: Mapping[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Pre-trained ``(params, batch_stats)`` for everything but the head.

  `path` is anything `store.load_for_inference` reads (a pre-training
  workdir, a step directory, a converted inference checkpoint). The backbone
  must match the config's exactly (the checkpoint metadata is checked first,
  then every variable's shape, against `abstract_variables` from
  ``jax.eval_shape``), so a wrong checkpoint fails before any compilation;
  the class count may differ since the head is re-initialised.
  """
  try:
    variables, metadata = store.load_for_inference(path)
  except store.CheckpointError as e:
    raise store.CheckpointError(
        f"config.init_checkpoint: {e}. Give a pre-training workdir or a "
        f"converted checkpoint; e.g. make the demo's with: python main.py "
        f"--config=configs/pretrain.py:demo --workdir={path}") from e
  # A workdir's newest step may have been skipped as damaged: say which.
  logging.info("config.init_checkpoint: step %d of %s.", metadata["step"],
               path)
  problems = [
      f"model.{key}: checkpoint {metadata['model'][key]}, config "
      f"{config.model[key]}" for key in ("depth", "width_multiplier")
      if metadata["model"][key] != config.model[key]]
  if not problems:
    for collection in ("params", "batch_stats"):
      want = flax.traverse_util.flatten_dict(abstract_variables[collection])
      got = flax.traverse_util.flatten_dict(variables[collection])
      for key in sorted(set(want) | set(got)):
        if key[0] == HEAD:
          continue
        if key not in got or key not in want:
          where = "checkpoint" if key not in got else "model"
          problems.append(f"{collection}/{'/'.join(key)} missing in the "
                          f"{where}")
        elif got[key].shape != want[key].shape:
          problems.append(f"{collection}/{'/'.join(key)}: checkpoint "
                          f"{got[key].shape}, model {want[key].shape}")
  if problems:
    raise store.CheckpointError(
        f"{path}: the backbone does not match the config: "
        + "; ".join(problems[:10])
        + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
  return ({k: v for k, v in variables["params"].items() if k != HEAD},
          {k: v for k, v in variables["batch_stats"].items() if k != HEAD})


def with_backbone(state: TrainState, params: Mapping[str, Any],
                  batch_stats: Mapping[str, Any]) -> TrainState:
  """`state` with every module but the head replaced (head kept as init)."""
  return state.replace(
      params={k: params.get(k, v) for k, v in state.params.items()},
      batch_stats={k: batch_stats.get(k, v)
                   for k, v in state.batch_stats.items()})
