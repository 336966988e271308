"""``mlimages classify | features | evaluate``: using a trained checkpoint.

Argument parsing and printing only; the work is in
mlimages_jax.inference.predict and mlimages_jax.evaluation.evaluator
(importable from a notebook).
"""

from __future__ import annotations

import argparse
import os
import sys

from mlimages_jax.cli import output_file


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _add_image_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("images", nargs="*", metavar="IMAGE",
                      help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF: what "
                      "OpenCV reads)")
  parser.add_argument("--list", dest="image_list", metavar="FILE",
                      help="a file with one image path per line (the path "
                      "ends at a TAB; with features --format original at a "
                      "space, followed by the label)")
  parser.add_argument("--root", metavar="DIR",
                      help="directory that relative paths in --list are "
                      "relative to (default: the current directory)")
  parser.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="a training workdir, one of its checkpoint steps, "
                      "or an inference checkpoint (e.g. a converted TF one)")
  parser.add_argument("--batch-size", type=_positive_int, default=32,
                      help="images per forward pass (default: %(default)s)")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
  classify = subparsers.add_parser(
      "classify", help="top-k classes of images",
      description="Prints the top-k classes (index, wnid or ImageNet id, "
      "name, probability) of each image; unreadable files are skipped. "
      "Probabilities: softmax for single-label checkpoints, sigmoid for "
      "multi-label ones.")
  _add_image_arguments(classify)
  classify.add_argument("--top-k", type=_positive_int, default=5,
                        help="classes per image (default: %(default)s)")
  classify.add_argument("--preprocess", choices=("original", "eval"),
                        default="original",
                        help="original: the original image_classification.py"
                        " (OpenCV, shorter side 256, centre 224 crop); eval: "
                        "the evaluation crop at the checkpoint's image size "
                        "(default: %(default)s)")
  classify.add_argument("--format", choices=("tsv", "original"),
                        default="tsv",
                        help="tsv: a TSV --out file; original: the original's"
                        " label_pred.txt blocks, printed and in --out "
                        "(default: %(default)s)")
  classify.add_argument("--out", metavar="FILE", type=output_file,
                        help="also write the predictions to FILE (e.g. "
                        "label_pred.txt)")
  classify.set_defaults(func=_classify)

  features = subparsers.add_parser(
      "features", help="pooled features of images (.npy)",
      description="The original extract_feature.py's preprocessing (OpenCV, "
      "shorter side 256, centre 224 crop, or the 10 crops averaged). Writes "
      "float32 (images, feature size) to FILE.npy and the images, one per "
      "row, to FILE.txt; with --format original the original's text file. "
      "Rerunning a killed run resumes it.")
  _add_image_arguments(features)
  features.add_argument("--crop", choices=("center", "10crop"),
                        default="center", help="default: %(default)s")
  features.add_argument("--format", choices=("npy", "original"),
                        default="npy",
                        help="original: FILE gets 'PATH<TAB>LABEL<TAB>f1 f2 "
                        "...' lines, LABEL from the --list line 'PATH LABEL' "
                        "(default: %(default)s)")
  features.add_argument("--out", required=True, metavar="FILE",
                        type=output_file)
  features.add_argument("--chunk-size", type=_positive_int, default=1024,
                        help="images per saved chunk: a killed run resumes "
                        "from FILE.npy.partial/ (default: %(default)s)")
  features.set_defaults(func=_features)

  evaluate = subparsers.add_parser(
      "evaluate", help="evaluate a checkpoint on a TFDS split",
      description="Single-label: top-1/top-5 accuracy. Multi-label: mAP, "
      "P/R/F1 at top-k per class and per image, mAP per hierarchy depth. "
      "Writes WORKDIR/eval_results.json; rerunning a killed evaluation "
      "resumes it.")
  evaluate.add_argument("--checkpoint", required=True, metavar="DIR")
  evaluate.add_argument("--dataset", required=True,
                        help="TFDS name, e.g. ml_images/full or imagenet2012")
  evaluate.add_argument("--data-dir", help="TFDS data directory")
  evaluate.add_argument("--split", default="validation")
  evaluate.add_argument("--image-size", type=_positive_int, action="append",
                        metavar="SIZE", help="repeatable, e.g. --image-size "
                        "224 --image-size 299 (default: the checkpoint's)")
  evaluate.add_argument("--batch-size", type=_positive_int, default=64,
                        help="global batch size (default: %(default)s)")
  evaluate.add_argument("--top-k", type=_positive_int, nargs="+",
                        default=[1, 5, 10],
                        help="k for multi-label P/R/F1 (default: 1 5 10)")
  evaluate.add_argument("--num-examples", type=int, default=0,
                        help="evaluate only the first N examples (0: all)")
  evaluate.add_argument("--workdir", required=True,
                        help="where eval_results.json is written")
  evaluate.add_argument("--no-progress", action="store_true")
  evaluate.set_defaults(func=_evaluate)


def _labelled_paths(args: argparse.Namespace, labelled: bool = False
                    ) -> tuple[list[str], list[str]] | None:
  """(paths, labels): the IMAGE arguments (no label), then the --list's."""
  from mlimages_jax import fileio
  from mlimages_jax.inference import predict
  paths, labels = list(args.images), [""] * len(args.images)
  if args.image_list:
    try:
      if labelled:
        listed, listed_labels = predict.read_labelled_image_list(
            args.image_list, args.root)
      else:
        listed = predict.read_image_list(args.image_list, args.root)
        listed_labels = [""] * len(listed)
    except OSError as e:
      print(f"error: cannot read --list {args.image_list}: {e}",
            file=sys.stderr)
      return None
    except fileio.TextInputError as e:  # Names the file and line.
      print(f"error: {e}", file=sys.stderr)
      return None
    paths += listed
    labels += listed_labels
  if not paths:
    print("error: no images given (IMAGE... or --list FILE)", file=sys.stderr)
    return None
  return paths, labels


def _outputs_overlap(args: argparse.Namespace, paths: list[str],
                     outputs: dict[str, object]) -> bool:
  """Prints why if an output is, holds or sits inside an input.

  Of the images, only those named like an output are compared (a --list
  may hold millions).
  """
  from mlimages_jax import fileio
  names = {os.path.basename(os.fspath(p)) for p in outputs.values()
           if p is not None}
  images = {f"IMAGE #{i}": p for i, p in enumerate(paths, 1)
            if os.path.basename(p) in names}
  try:
    fileio.check_disjoint({"--checkpoint": args.checkpoint,
                           "--list": args.image_list, **images}, outputs)
  except fileio.OverlapError as e:
    print(f"error: {e}", file=sys.stderr)
    return True
  return False


def _load(checkpoint: str):
  from mlimages_jax.checkpoints import store
  from mlimages_jax.inference import predict
  try:
    model = predict.LoadedModel.load(checkpoint)
  except store.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return None
  # A workdir's newest step may have been skipped as damaged: say which.
  print(f"using step {model.metadata['step']} of {checkpoint}",
        file=sys.stderr)
  return model


def _report(verb: str, done: int, failures) -> int:
  for failure in failures:
    print(f"skipped {failure.path}: {failure.reason}", file=sys.stderr)
  total = done + len(failures)
  print(f"{verb} {done} of {total} images"
        + (f" ({len(failures)} skipped)" if failures else ""), file=sys.stderr)
  return 0 if done else 1


def _classify(args: argparse.Namespace) -> int:
  from mlimages_jax.inference import predict
  listed = _labelled_paths(args)
  if listed is None:
    return 2
  paths, _ = listed
  if _outputs_overlap(args, paths, {"--out": args.out}):
    return 1
  model = _load(args.checkpoint)
  if model is None:
    return 1
  predictions, failures = predict.classify(
      model, paths, top_k=args.top_k, batch_size=args.batch_size,
      preprocess=args.preprocess, progress=not args.no_progress)
  if args.format == "original":
    for line in predict.label_pred_lines(predictions, failures):
      print(line)
  else:
    for p in predictions:
      print(p.path)
      for rank, (index, class_id, name, prob) in enumerate(p.classes, 1):
        print(f"  {rank}. {prob:.4f}  {index:>5}  {class_id}  {name}")
  if args.out and predictions:
    if args.format == "original":
      predict.write_label_pred(args.out, predictions, failures)
    else:
      predict.write_predictions(args.out, predictions)
    print(f"wrote {args.out}", file=sys.stderr)
  return _report("classified", len(predictions), failures)


def _features(args: argparse.Namespace) -> int:
  from mlimages_jax.inference import predict
  listed = _labelled_paths(args, labelled=args.format == "original")
  if listed is None:
    return 2
  paths, labels = listed
  outputs = {"--out": args.out, "--out (partial results)":
             f"{args.out}{predict.PARTIAL_SUFFIX}"}
  if args.format == "npy":
    outputs["--out (list of images)"] = predict.features_list_path(args.out)
  if _outputs_overlap(args, paths, outputs):
    return 1
  model = _load(args.checkpoint)
  if model is None:
    return 1
  try:
    features, kept, failures = predict.extract_features_to_file(
        model, paths, args.out, crop=args.crop, batch_size=args.batch_size,
        chunk_size=args.chunk_size, progress=not args.no_progress,
        output_format=args.format, labels=labels)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if kept and args.format == "original":
    print(f"wrote {args.out} ({len(kept)} lines of {features.shape[1]} "
          "values)", file=sys.stderr)
  elif kept:
    print(f"wrote {args.out} {features.shape} and "
          f"{predict.features_list_path(args.out)}", file=sys.stderr)
  return _report("extracted features of", len(kept), failures)


def _evaluate(args: argparse.Namespace) -> int:
  import json

  from mlimages_jax import fileio
  from mlimages_jax.checkpoints import store
  from mlimages_jax.evaluation import evaluator
  from mlimages_jax.inputs import pipeline
  try:
    results = evaluator.evaluate_checkpoint(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
        split=args.split, image_size=args.image_size,
        batch_size=args.batch_size, workdir=args.workdir,
        top_k=tuple(args.top_k), num_examples=args.num_examples,
        progress=not args.no_progress)
  except (store.CheckpointError, pipeline.DatasetNotBuiltError,
          evaluator.EvaluationError, fileio.OverlapError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(evaluator.summary(results), indent=1))
  print(f"wrote {results['path']}", file=sys.stderr)
  return 0
