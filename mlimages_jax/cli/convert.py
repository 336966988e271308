"""``mlimages convert-tf-checkpoint``: the original released TF1 checkpoints.

Argument parsing and printing only; the work is in
``mlimages_jax.checkpoints.convert_tf``.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
  """Adds the conversion command."""
  p = subparsers.add_parser(
      "convert-tf-checkpoint",
      help="convert an original ML-Images TF1 checkpoint to Orbax",
      description="Convert a checkpoint written by the original "
      "tencent-ml-images code (e.g. ckpt-resnet101-mlimages, 11,166 classes, "
      "or ckpt-resnet101-mlimages-imagenet, 1000 classes) into an Orbax "
      "inference checkpoint that classify, features, evaluation and "
      "fine-tuning accept. Depth, width and class count are read from the "
      "checkpoint; the flags only double-check them.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("tf_checkpoint", metavar="TF_CKPT_PREFIX",
                 help="checkpoint prefix (the path without .index / "
                 ".data-00000-of-00001)")
  p.add_argument("--out", required=True, help="output directory (written "
                 "atomically; must not exist unless --overwrite)")
  p.add_argument("--num-classes", type=int, default=None,
                 help="expected number of classes (checked)")
  p.add_argument("--depth", type=int, default=None,
                 help="expected ResNet depth (checked)")
  p.add_argument("--dictionary", default=None,
                 help="class ids/names: dictionary_and_semantic_hierarchy.txt "
                 "(11,166 classes) or imagenet2012_dictionary.txt (1000); "
                 "without it ids are ImageNet wnids (1000 classes) or indices")
  p.add_argument("--image-size", type=int, default=224,
                 help="the resolution the model was trained for (299 for "
                 "models fine-tuned 224->299)")
  p.add_argument("--label-mode", choices=("multi", "single"), default=None,
                 help="sigmoid multi-label or softmax single-label (default: "
                 "single for 1000 classes, multi otherwise)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out that is an inference "
                 "checkpoint (any other directory is refused)")
  p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
  # pylint: disable=g-import-not-at-top
  from mlimages_jax import fileio
  from mlimages_jax.checkpoints import store
  from mlimages_jax.checkpoints import convert_tf
  from mlimages_jax.data import hierarchy

  try:
    result = convert_tf.convert_checkpoint(
        args.tf_checkpoint, args.out, depth=args.depth,
        num_classes=args.num_classes, dictionary=args.dictionary,
        image_size=args.image_size, label_mode=args.label_mode,
        overwrite=args.overwrite)
  except (convert_tf.ConversionError, store.CheckpointError,
          hierarchy.HierarchyError, fileio.OverlapError, OSError) as e:
    print(f"mlimages convert-tf-checkpoint: error: {args.tf_checkpoint}: {e}",
          file=sys.stderr)
    print("Nothing was written.", file=sys.stderr)
    return 1
  spec = result.spec
  print(f"Converted ResNet-{spec.depth} (width {spec.width_multiplier:g}, "
        f"{spec.num_classes} classes): {result.converted} variables copied, "
        f"{len(result.ignored)} training-state variables ignored "
        f"(global_step, momentum slots, loss counters).")
  if args.dictionary is None and spec.num_classes != 1000:
    print("Note: no --dictionary, so class ids and names are the indices; "
          "pass dictionary_and_semantic_hierarchy.txt for wnids and names.")
  print(f"Wrote {result.path}")
  return 0
