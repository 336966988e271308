"""``mlimages download | imagenet21k extract | dedup``: getting the images.

Argument parsing and printing only; the work is in ``mlimages_jax.acquire``.
"""

from __future__ import annotations

import argparse
import json
import sys

from mlimages_jax.cli import output_file


def _add_list_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--skip-invalid", action="store_true",
                 help="skip (and count) malformed list lines instead of "
                 "stopping with file:line")
  p.add_argument("--num-classes", type=int, default=None,
                 help="reject class indices >= this (default: no check)")


def register(subparsers) -> None:
  """Adds the acquisition commands."""
  # Light: numpy + labels.
  from mlimages_jax.acquire import download as dl
  from mlimages_jax.acquire import naming
  from mlimages_jax.acquire import validation

  p = subparsers.add_parser(
      "download", help="download an ML-Images URL list (resumable)",
      description="Download the images of a URL list into OUT/images/, "
      "writing OUT/im_list.txt, OUT/failed.tsv and OUT/stats.json. Rerun the "
      "same command to resume after an interruption (also after SIGKILL). "
      "OUT is a <manual_dir>/openimages/<split>/ folder of the TFDS builder.")
  p.add_argument("url_list")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--workers", type=int, default=dl.DEFAULT_WORKERS,
                 help="concurrent connections in total (default %(default)s)")
  p.add_argument("--per-host", type=int, default=dl.DEFAULT_PER_HOST,
                 help="concurrent connections per host (default %(default)s)")
  p.add_argument("--processes", type=int, default=0,
                 help="event-loop processes sharing the connections (default: "
                 "one per 4 CPUs, 1 to 4)")
  p.add_argument("--threads", type=int, default=dl.DownloadConfig.threads,
                 help="validation/write threads in all (default %(default)s)")
  p.add_argument("--timeout", type=float, default=dl.DownloadConfig.timeout,
                 help="seconds without progress (connect or read) before an "
                 "attempt times out; a whole attempt gets 10x (default "
                 "%(default)s)")
  p.add_argument("--retries", type=int, default=dl.DownloadConfig.retries,
                 help="retries after timeouts, 5xx, 429 and broken "
                 "transfers, with exponential backoff and jitter (default "
                 "%(default)s)")
  p.add_argument("--max-retry-after", type=float,
                 default=dl.DownloadConfig.max_retry_after,
                 help="cap on a server's Retry-After wait, seconds")
  p.add_argument("--max-redirects", type=int,
                 default=dl.DownloadConfig.max_redirects)
  p.add_argument("--shard", default="0/1",
                 help="I/N: download only the I-th of N contiguous parts "
                 "(0-based) of the list; names stay globally unique")
  p.add_argument("--max-side", type=int, default=None,
                 help="re-encode images whose longer side exceeds PX")
  p.add_argument("--quality", type=int,
                 default=validation.ValidationConfig.quality,
                 help="JPEG quality for --max-side re-encoding")
  p.add_argument("--verify", choices=("header", "full"), default="header",
                 help="header: magic bytes, PIL header, end marker; full: "
                 "also decode every image (catches corrupt streams; more CPU)")
  p.add_argument("--name-rule", choices=sorted(naming.NAME_RULES),
                 default="folder_file",
                 help="folder_file: <last URL folder>_<file name> (the "
                 "original's documented rule); file: the URL's file name only "
                 "(what the shipped train_im_list_tiny.txt contains)")
  p.add_argument("--placeholder-url", action="append", default=None,
                 metavar="REGEX", help="redirect targets that mean 'photo "
                 "unavailable' (default: %s)"
                 % " ".join(dl.DEFAULT_PLACEHOLDER_URL_PATTERNS))
  p.add_argument("--placeholder-hash", action="append", default=[],
                 metavar="SHA256", help="SHA-256 of a placeholder image")
  p.add_argument("--placeholder-hashes", action="append", default=[],
                 metavar="FILE", help="file of placeholder SHA-256 digests")
  p.add_argument("--retry-failed", action="store_true",
                 help="on resume, retry items that failed before")
  p.add_argument("--no-fsync", action="store_true",
                 help="do not fsync each image (faster; a SIGKILL is still "
                 "safe, a power loss may not be)")
  p.add_argument("--no-progress", action="store_true")
  _add_list_options(p)
  p.set_defaults(func=_download)

  p = subparsers.add_parser(
      "imagenet21k", help="extract listed ImageNet-21k images",
      description="Extract the images of an ImageNet ID list from a local "
      "copy of the full ImageNet.")
  sub = p.add_subparsers(dest="imagenet21k_command", metavar="<command>")
  e = sub.add_parser(
      "extract", help="extract the listed IDs (resumable)",
      description="PATH is an extracted tree (<wnid>/<wnid>_<n>.JPEG), a "
      "folder of per-synset tars (<wnid>.tar) or the single release tar "
      "(tar of per-synset tars; .tar.gz too). Tars are streamed. Writes "
      "OUT/images/, OUT/im_list.txt, OUT/missing.txt, OUT/stats.json.")
  e.add_argument("id_list")
  e.add_argument("--imagenet", required=True, metavar="PATH")
  e.add_argument("--out", required=True)
  e.add_argument("--threads", type=int, default=16,
                 help="validation/write threads (default %(default)s)")
  e.add_argument("--no-progress", action="store_true")
  _add_list_options(e)
  e.set_defaults(func=_imagenet21k_extract)

  p = subparsers.add_parser(
      "dedup", help="find (and drop) duplicate images",
      description="Group exact duplicates (SHA-256 of the bytes) and, with "
      "--near, near-duplicates (perceptual hash). Inputs are image-list "
      "folders (DIR/im_list.txt + DIR/images/) or list files whose images "
      "are in <list folder>/images/.")
  p.add_argument("inputs", nargs="+", metavar="DIR_OR_LIST")
  p.add_argument("--out", default="dups.tsv", type=output_file,
                 help="groups report (TSV)")
  p.add_argument("--near", action="store_true",
                 help="also group near-duplicates")
  p.add_argument("--hash", choices=("phash", "dhash"), default="phash",
                 help="perceptual hash for --near")
  p.add_argument("--threshold", type=int, default=8,
                 help="max Hamming distance (of 64 bits) for --near")
  p.add_argument("--drop", action="store_true",
                 help="write <list>.dedup.txt per input: one image per group, "
                 "annotations merged (union, highest confidence)")
  p.add_argument("--in-place", action="store_true",
                 help="with --drop: replace each im_list.txt (the original "
                 "is kept as im_list.txt.bak)")
  p.add_argument("--workers", type=int, default=0,
                 help="hashing threads (default: 2x CPUs)")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=_dedup)


def _download(args: argparse.Namespace) -> int:
  from mlimages_jax.data import annotations
  from mlimages_jax.acquire import download as dl
  from mlimages_jax.acquire import errors
  from mlimages_jax.acquire import image_list
  from mlimages_jax.acquire import validation

  try:
    config = dl.DownloadConfig(
        workers=args.workers, per_host=args.per_host,
        processes=args.processes, threads=args.threads, timeout=args.timeout,
        retries=args.retries, max_retry_after=args.max_retry_after,
        max_redirects=args.max_redirects,
        shard=image_list.parse_shard(args.shard),
        skip_invalid=args.skip_invalid, num_classes=args.num_classes,
        name_rule=args.name_rule,
        placeholder_url_patterns=tuple(
            args.placeholder_url or dl.DEFAULT_PLACEHOLDER_URL_PATTERNS),
        validation=validation.ValidationConfig(
            placeholder_hashes=dl.load_placeholder_hashes(
                args.placeholder_hashes, args.placeholder_hash),
            verify=args.verify, max_side=args.max_side,
            quality=args.quality),
        retry_failed=args.retry_failed, fsync=not args.no_fsync,
        progress=not args.no_progress)
    stats = dl.download(args.url_list, args.out, config)
  except (ValueError, OSError, errors.AcquireError,
          annotations.LabelError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  _print_summary(stats)
  return 0 if not stats["last_run"]["interrupted"] else 130


def _imagenet21k_extract(args: argparse.Namespace) -> int:
  from mlimages_jax.data import annotations
  from mlimages_jax.acquire import errors
  from mlimages_jax.acquire import imagenet21k

  try:
    stats = imagenet21k.extract(
        args.id_list, args.imagenet, args.out,
        skip_invalid=args.skip_invalid, num_classes=args.num_classes,
        threads=args.threads, progress=not args.no_progress)
  except (ValueError, OSError, errors.AcquireError,
          annotations.LabelError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  _print_summary(stats)
  if stats["missing"]:
    print(f"{stats['missing']} IDs are not in {args.imagenet}; listed in "
          f"{args.out}/missing.txt")
  return 0


def _dedup(args: argparse.Namespace) -> int:
  from mlimages_jax.data import annotations
  from mlimages_jax.acquire import dedup
  from mlimages_jax.acquire import errors

  if args.in_place and not args.drop:
    print("error: --in-place needs --drop", file=sys.stderr)
    return 2
  try:
    dedup.check_outputs(args.inputs, args.out, drop=args.drop,
                        in_place=args.in_place)
    report = dedup.find_duplicates(
        args.inputs, near=args.near, hash_kind=args.hash,
        threshold=args.threshold, workers=args.workers,
        progress=not args.no_progress)
    dedup.write_report(report, args.out)
    written = (dedup.drop_duplicates(report, in_place=args.in_place)
               if args.drop else [])
  except (ValueError, OSError, errors.AcquireError,
          annotations.LabelError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{report.num_images} images, {len(report.groups)} duplicate groups "
        f"({report.num_exact_groups} exact, "
        f"{len(report.groups) - report.num_exact_groups} near), "
        f"{report.num_redundant} redundant images; report: {args.out}")
  for path in written:
    print(f"de-duplicated list: {path}")
  return 0


def _print_summary(stats: dict) -> None:
  print(json.dumps(stats, sort_keys=True))
