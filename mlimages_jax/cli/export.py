"""``mlimages export``: a checkpoint as PyTorch weights or a TF SavedModel.

Argument parsing and printing only; the work is in mlimages_jax.export.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("pytorch", "savedmodel")


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "export", help="export a checkpoint to PyTorch or a TF SavedModel",
      description="pytorch: model.safetensors + mlimages_resnet.py (a "
      "self-contained PyTorch module returning logits and pooled features) "
      "+ config.json + classes.json. savedmodel: a TF SavedModel whose "
      "serving_default signature takes uint8 images [batch, height, width, "
      "3] and returns probabilities, features and logits, + classes.json. "
      "The directory is written atomically and may not overlap the "
      "checkpoint; a checkpoint whose weights do not fit its metadata is "
      "refused.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--checkpoint", required=True, metavar="DIR",
                 help="a training workdir, one of its steps, or an inference "
                 "checkpoint")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--out", required=True, metavar="DIR",
                 help="output directory (must not exist unless --overwrite)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out that is an earlier export "
                 "of this format (any other directory is refused)")
  p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
  from mlimages_jax import fileio
  from mlimages_jax.checkpoints import store
  if args.format == "pytorch":
    from mlimages_jax.export import pytorch as exporter
  else:
    from mlimages_jax.export import savedmodel as exporter
  try:
    path = exporter.export(args.checkpoint, args.out,
                           overwrite=args.overwrite)
  except (store.CheckpointError, fileio.OverlapError, OSError) as e:
    print(f"mlimages export: error: {e}", file=sys.stderr)
    print("Nothing was written.", file=sys.stderr)
    return 1
  print(f"Wrote {path}")
  return 0
