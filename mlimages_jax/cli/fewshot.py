"""``mlimages fewshot``: few-shot linear probes of a checkpoint's features.

Argument parsing and printing only; the work is in
mlimages_jax.evaluation.fewshot.
"""

from __future__ import annotations

import argparse
import sys

from mlimages_jax.cli import output_file


def _dataset(text: str) -> tuple[str, str, str]:
  parts = text.split(",")
  if len(parts) == 1:
    return parts[0], "train", "test"
  if len(parts) != 3 or not all(parts):
    raise argparse.ArgumentTypeError(
        f"expected NAME or NAME,TRAIN_SPLIT,TEST_SPLIT, got {text!r}")
  return parts[0], parts[1], parts[2]


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "fewshot", help="few-shot linear probes of a checkpoint's features",
      description="For k examples per class of each dataset's train split, "
      "fits a ridge regression on the checkpoint's pooled features (closed "
      "form) and prints the accuracy on its test split, averaged over the "
      "seeds. Datasets are TFDS classification datasets with a `label`, e.g. "
      "cifar100, caltech101,train,test, oxford_iiit_pet,train,test, "
      "dtd,train,test (build them with `tfds build NAME`).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--checkpoint", required=True, metavar="DIR")
  p.add_argument("--dataset", required=True, action="append", type=_dataset,
                 metavar="NAME[,TRAIN,TEST]",
                 help="repeatable; splits default to train,test")
  p.add_argument("--data-dir", help="TFDS data directory")
  p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--l2-reg", type=float, default=1024.0)
  p.add_argument("--image-size", type=int, default=0,
                 help="0: the checkpoint's image size")
  p.add_argument("--batch-size", type=int, default=64,
                 help="global; divisible by the device count")
  p.add_argument("--pool-per-class", type=int, default=50,
                 help="train examples read per class (shots drawn from them)")
  p.add_argument("--num-test-examples", type=int, default=10_000,
                 help="-1: the whole test split")
  p.add_argument("--out", metavar="FILE.json", type=output_file,
                 help="also write the results as JSON (atomically)")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=_fewshot)


def _fewshot(args: argparse.Namespace) -> int:
  import json

  from mlimages_jax import fileio
  from mlimages_jax.checkpoints import store
  from mlimages_jax.evaluation import fewshot
  from mlimages_jax.inference import predict
  from mlimages_jax.inputs import pipeline
  try:
    fileio.check_disjoint({"--checkpoint": args.checkpoint},
                          {"--out": args.out})
    model = predict.LoadedModel.load(args.checkpoint)
    evaluator = fewshot.FewshotEvaluator(
        fewshot.tasks_from_config(args.dataset), shots=args.shots,
        seeds=args.seeds, l2_reg=args.l2_reg, batch_size=args.batch_size,
        pool_per_class=args.pool_per_class,
        num_test_examples=args.num_test_examples, data_dir=args.data_dir,
        progress=not args.no_progress)
    results = fewshot.evaluate_checkpoint(model, evaluator,
                                          args.image_size or None)
  except (store.CheckpointError, pipeline.DatasetNotBuiltError,
          ValueError) as e:
    print(f"mlimages fewshot: error: {e}", file=sys.stderr)
    return 1
  results = {"checkpoint": model.source, **results}
  print(json.dumps(results, indent=1))
  if args.out:
    with fileio.atomic_writer(args.out) as f:
      json.dump(results, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
  return 0
