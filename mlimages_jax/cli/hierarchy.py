"""`mlimages hierarchy ...`: inspect and validate the semantic hierarchy."""

from __future__ import annotations

import argparse
import json
import sys

from mlimages_jax.data import hierarchy as hierarchy_lib


def add_dictionary_argument(parser: argparse.ArgumentParser) -> None:
  """--dictionary and --cache, shared by the label commands."""
  parser.add_argument(
      "--dictionary", required=True,
      help="dictionary_and_semantic_hierarchy.txt: a path, or an http(s) URL "
      f"such as {hierarchy_lib.ORIGINAL_URL}")
  parser.add_argument("--cache", default=None,
                      help="where to keep a downloaded --dictionary URL")


def load_dictionary(args: argparse.Namespace) -> hierarchy_lib.Hierarchy:
  return hierarchy_lib.load(args.dictionary, cache_path=args.cache)


def register(subparsers) -> None:
  parser = subparsers.add_parser(
      "hierarchy", help="inspect and validate the semantic hierarchy")
  commands = parser.add_subparsers(dest="hierarchy_command",
                                   metavar="<subcommand>", required=True)

  stats = commands.add_parser(
      "stats", help="validate the hierarchy and print its shape")
  add_dictionary_argument(stats)
  stats.add_argument("--json", action="store_true",
                     help="print one JSON object instead of text")
  stats.set_defaults(func=_stats)

  show = commands.add_parser(
      "show", help="a class's path to its root and its children")
  show.add_argument("query", help="class index, wnid, or name (every match)")
  add_dictionary_argument(show)
  show.add_argument("--max-children", type=int, default=50,
                    help="list at most this many children (default 50)")
  show.set_defaults(func=_show)


def _stats(args: argparse.Namespace) -> int:
  try:
    stats = load_dictionary(args).stats()
  except (OSError, hierarchy_lib.HierarchyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(stats))
    return 0
  print(f"{stats['source']}: {stats['num_categories']} categories, "
        f"{stats['num_roots']} roots, {stats['num_leaves']} leaves")
  print("roots: " + "; ".join(stats["roots"]))
  print(f"depth: max {stats['max_depth']}, mean {stats['mean_depth']:.3f}")
  for depth, count in stats["depth_histogram"].items():
    print(f"  depth {depth:>2}: {count}")
  print(f"repeated names: {stats['num_repeated_names']}; "
        f"most children: {stats['max_children']}")
  return 0


def _show(args: argparse.Namespace) -> int:
  try:
    tree = load_dictionary(args)
  except (OSError, hierarchy_lib.HierarchyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  matches = tree.find(args.query)
  if not matches:
    print(f"error: no class matches {args.query!r}", file=sys.stderr)
    return 1
  for n, index in enumerate(matches):
    if n:
      print()
    print(f"{index}\t{tree.wnids[index]}\t{tree.names[index]}\t"
          f"(depth {int(tree.depth[index])})")
    print("path to root:")
    for k, wnid, name in tree.name_path(index):
      print(f"  {k}\t{wnid}\t{name}")
    children = tree.children(index)
    print(f"children: {len(children)}")
    for child in children[:args.max_children].tolist():
      print(f"  {child}\t{tree.wnids[child]}\t{tree.names[child]}")
    if len(children) > args.max_children:
      print(f"  ... {len(children) - args.max_children} more")
  return 0
