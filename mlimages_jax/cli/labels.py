"""`mlimages labels ...`: augment, remap, co-occurrence and statistics."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Iterator

from mlimages_jax.cli import output_file
from mlimages_jax.cli.hierarchy import add_dictionary_argument
from mlimages_jax.cli.hierarchy import load_dictionary
from mlimages_jax import fileio
from mlimages_jax.data import annotations
from mlimages_jax.data import cooccurrence
from mlimages_jax.data import openimages
from mlimages_jax.data.augment import augment_file

# LabelError, HierarchyError and OverlapError are ValueErrors.
_BAD_INPUT = (OSError, ValueError)
_STATS_FILES = ("stats.json", "num_images_per_class.png",
                "hist_num_annotations.png")


def register(subparsers) -> None:
  parser = subparsers.add_parser(
      "labels", help="augment, remap, co-occurrence and statistics of "
      "annotation lists")
  commands = parser.add_subparsers(dest="labels_command",
                                   metavar="<subcommand>", required=True)

  augment = commands.add_parser(
      "augment", help="close annotations over the hierarchy (and add "
      "co-occurring tags): same keys, same order")
  augment.add_argument("input", help="annotation list (.gz is read)")
  augment.add_argument("output", help="written atomically (.gz compresses)")
  add_dictionary_argument(augment)
  augment.add_argument("--cooccurrence", default=None,
                       help="cooccurrence_pairs.tsv from `labels "
                       "cooccurrence`")
  _add_skip_invalid(augment)
  augment.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="processes augmenting chunks of the file; output "
                       "order is kept (default: all CPUs, %(default)s here; "
                       "fewer for small files)")
  augment.set_defaults(func=_augment)

  remap = commands.add_parser(
      "remap", help="Open Images tags -> ML-Images indices (unmapped tags "
      "dropped and counted)")
  remap.add_argument("input", help="lines `key label_id[:conf] ...` or the "
                     "Open Images image-level labels CSV")
  remap.add_argument("output", help="ML-Images annotation list (atomic)")
  remap.add_argument("--mapping", required=True,
                     help="lines `<Open Images label id> <ML-Images index>`")
  add_dictionary_argument(remap)
  remap.add_argument("--keep-empty", action="store_true",
                     help="keep rows left without tags (default: drop them)")
  _add_skip_invalid(remap)
  remap.set_defaults(func=_remap)

  cooc = commands.add_parser(
      "cooccurrence", help="strong ImageNet x Open Images pairs from model "
      "scores on single-label ImageNet images")
  cooc.add_argument("--scores", required=True,
                    help=".npy float matrix [images, Open Images classes] "
                    "(memory-mapped)")
  cooc.add_argument("--images", required=True,
                    help="annotation list of the same images in the same "
                    "order (each line's deepest positive class is used)")
  cooc.add_argument("--columns", required=True,
                    help="one ML-Images class index per score column")
  add_dictionary_argument(cooc)
  cooc.add_argument("--out", required=True, type=output_file,
                    help="output TSV (e.g. cooccurrence_pairs.tsv), atomic")
  defaults = cooccurrence.CooccurrenceRules()
  cooc.add_argument("--threshold", type=float, default=defaults.threshold,
                    help="minimum mean score of the tag on the class's "
                    "images (default %(default)s)")
  cooc.add_argument("--min-lift", type=float, default=defaults.min_lift,
                    help="minimum mean score / overall mean score "
                    "(default %(default)s)")
  cooc.add_argument("--top-k", type=int, default=defaults.top_k,
                    help="at most this many tags per class (default "
                    "%(default)s)")
  cooc.add_argument("--min-images", type=int, default=defaults.min_images,
                    help="skip classes with fewer images (default "
                    "%(default)s)")
  cooc.set_defaults(func=_cooccurrence)

  stats = commands.add_parser(
      "stats", help="dataset statistics and the two figures of ML-Images")
  stats.add_argument("lists", nargs="+", metavar="LIST",
                     help="annotation lists")
  add_dictionary_argument(stats)
  stats.add_argument("--out", required=True,
                     help="folder for stats.json, num_images_per_class.png "
                     "and hist_num_annotations.png")
  stats.add_argument("--trainable-min-images", type=int, default=100,
                     help="a class is trainable with more than this many "
                     "images (default %(default)s)")
  _add_skip_invalid(stats)
  stats.set_defaults(func=_stats)


def _add_skip_invalid(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--skip-invalid", action="store_true",
                      help="skip malformed lines and report their count "
                      "(default: stop at the first with file:line)")


@contextlib.contextmanager
def _progress(total: int, desc: str, unit: str = "B") -> Iterator:
  """A tqdm bar on stderr fed absolute positions; yields the update callback."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with tqdm(total=total, desc=desc, unit=unit, unit_scale=True,
            file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as bar:
    def update(position: int) -> None:
      bar.update(position - bar.n)
    yield update


def _check_disjoint(rewritable: dict[str, str | None],
                    inputs: dict[str, str | None],
                    outputs: dict[str, str]) -> None:
  """No output over an input; the `rewritable` one may be replaced in place
  (atomically, once read: ``labels augment LIST LIST``)."""
  fileio.check_disjoint(rewritable, outputs, in_place=True)
  fileio.check_disjoint(inputs, outputs)


def _report_invalid(count: int, examples: list[str]) -> None:
  if count:
    print(f"skipped {count} invalid line(s); first: ", file=sys.stderr)
    for message in examples[:5]:
      print(f"  {message}", file=sys.stderr)


def _augment(args: argparse.Namespace) -> int:
  start = time.perf_counter()
  try:
    _check_disjoint({"INPUT": args.input}, {
        "--dictionary": args.dictionary, "--cache": args.cache,
        "--cooccurrence": args.cooccurrence}, {"OUTPUT": args.output})
    tree = load_dictionary(args)
    pairs = (None if args.cooccurrence is None else
             cooccurrence.load_cooccurrence_pairs(args.cooccurrence,
                                                  tree.num_classes))
    with _progress(os.path.getsize(args.input), "augment") as progress:
      summary = augment_file(tree, args.input, args.output, pairs=pairs,
                             skip_invalid=args.skip_invalid,
                             workers=args.workers, progress=progress)
  except _BAD_INPUT as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  seconds = time.perf_counter() - start
  _report_invalid(summary.invalid, summary.invalid_examples)
  rows = max(summary.rows, 1)
  print(f"augmented {summary.rows} rows in {seconds:.1f} s "
        f"({summary.rows / max(seconds, 1e-9):,.0f} rows/s, "
        f"{summary.kernel_rows / rows:.0%} by the compiled kernel, "
        f"{summary.memo_hits / rows:.0%} from the memo, {summary.workers} "
        f"worker(s)), {summary.invalid} invalid line(s) skipped -> "
        f"{args.output}")
  return 0


def _remap(args: argparse.Namespace) -> int:
  try:
    _check_disjoint({"INPUT": args.input}, {
        "--mapping": args.mapping, "--dictionary": args.dictionary,
        "--cache": args.cache}, {"OUTPUT": args.output})
    tree = load_dictionary(args)
    mapping = openimages.load_openimages_mapping(args.mapping,
                                                 tree.num_classes)
    with _progress(os.path.getsize(args.input), "remap") as progress:
      summary = openimages.remap_openimages_file(
          args.input, args.output, mapping, keep_empty=args.keep_empty,
          skip_invalid=args.skip_invalid, progress=progress)
  except _BAD_INPUT as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  _report_invalid(summary.invalid, summary.invalid_examples)
  top = sorted(summary.unmapped.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
  print(f"remapped {summary.rows_in} rows -> {summary.rows_out} "
        f"({summary.rows_empty} without mapped tags "
        f"{'kept' if args.keep_empty else 'dropped'}); tags {summary.tags_in}:"
        f" {summary.tags_kept} kept, {summary.tags_dropped} dropped over "
        f"{len(summary.unmapped)} unmapped ids -> {args.output}")
  if top:
    print("most frequent unmapped: " + ", ".join(f"{k} ({v})" for k, v in top))
  return 0


def _cooccurrence(args: argparse.Namespace) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top
  try:
    _check_disjoint({}, {
        "--scores": args.scores, "--images": args.images,
        "--columns": args.columns, "--dictionary": args.dictionary,
        "--cache": args.cache}, {"--out": args.out})
    tree = load_dictionary(args)
    scores = np.load(args.scores, mmap_mode="r")
    if scores.ndim != 2:
      raise ValueError(f"{args.scores}: expected a 2-D score matrix, got "
                       f"shape {scores.shape}")
    columns = _read_columns(args.columns, tree.num_classes)
    classes = cooccurrence.image_classes(args.images, tree)
    if len(classes) != scores.shape[0]:
      raise ValueError(f"{args.images}: {len(classes)} images but "
                       f"{args.scores} has {scores.shape[0]} rows")
    rules = cooccurrence.CooccurrenceRules(
        threshold=args.threshold, min_lift=args.min_lift, top_k=args.top_k,
        min_images=args.min_images)
    with _progress(scores.shape[0], "co-occurrence", unit="img") as progress:
      matrix = cooccurrence.cooccurrence_matrix(scores, classes, columns,
                                                progress=progress)
    pairs = cooccurrence.select_pairs(matrix, tree, rules)
    pairs.save(args.out, tree, rules)
  except _BAD_INPUT as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{len(pairs)} pairs over {len(np.unique(pairs.sources))} of "
        f"{len(matrix.classes)} ImageNet classes "
        f"({json.dumps(dataclasses.asdict(rules))}) -> {args.out}")
  return 0


def _read_columns(path: str, num_classes: int) -> list[int]:
  columns = []
  with fileio.open_text(path, annotations.LabelError) as f:
    for lineno, line in enumerate(f, start=1):
      text = line.split("#")[0].strip()
      if not text:
        continue
      try:
        index = int(text.split()[0])
      except ValueError:
        raise annotations.LabelError(path, lineno, f"expected an ML-Images "
                                     f"class index, got {text!r}") from None
      if not 0 <= index < num_classes:
        raise annotations.LabelError(path, lineno, f"class index {index} "
                                     f"out of range 0..{num_classes - 1}")
      columns.append(index)
  return columns


def _stats(args: argparse.Namespace) -> int:
  # pylint: disable-next=g-import-not-at-top
  from mlimages_jax.data import stats as stats_lib
  try:
    _check_disjoint({}, {
        **{f"LIST #{i}": p for i, p in enumerate(args.lists, 1)},
        "--dictionary": args.dictionary, "--cache": args.cache},
        {f"--out ({name})": os.path.join(args.out, name)
         for name in _STATS_FILES})
    tree = load_dictionary(args)
    total = sum(os.path.getsize(p) for p in args.lists)
    with _progress(total, "stats") as progress:
      stats = stats_lib.compute_stats(args.lists, tree.num_classes,
                                      skip_invalid=args.skip_invalid,
                                      progress=progress)
    summary = stats.summary(tree,
                            trainable_min_images=args.trainable_min_images)
    summary["lists"] = list(args.lists)
    os.makedirs(args.out, exist_ok=True)
    stats_lib.plot_images_per_class(
        stats, os.path.join(args.out, "num_images_per_class.png"),
        trainable_min_images=args.trainable_min_images)
    stats_lib.plot_tags_histogram(
        stats, os.path.join(args.out, "hist_num_annotations.png"))
    with fileio.atomic_writer(os.path.join(args.out, "stats.json"),
                                     "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
      f.write("\n")
  except _BAD_INPUT as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  _report_invalid(stats.invalid, [])
  print(json.dumps({k: summary[k] for k in (
      "num_images", "num_classes", "num_trainable_classes",
      "avg_tags_per_image", "avg_images_per_class")}))
  print(f"wrote stats.json, num_images_per_class.png, "
        f"hist_num_annotations.png to {args.out}")
  return 0
