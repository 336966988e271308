"""The ``mlimages`` command line: argument parsing and printing only.

Each command group lives in its own module under ``mlimages_jax.cli`` and
exposes ``register(subparsers)``, which adds its sub-commands and sets
``func`` (called with the parsed namespace, returning an exit code). Those
modules import heavy libraries (JAX, TensorFlow) only inside the functions
that run a command, so ``mlimages --help`` and the label tools start fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import NoReturn, Sequence

from mlimages_jax import __version__
from mlimages_jax import fast_exit

# Modules that register command groups, in the order --help lists them.
_COMMAND_MODULES = (
    "mlimages_jax.cli.hierarchy",
    "mlimages_jax.cli.labels",
    "mlimages_jax.cli.acquire",
    "mlimages_jax.cli.inference",
    "mlimages_jax.cli.convert",
    "mlimages_jax.cli.export",
    "mlimages_jax.cli.fewshot",
)


def output_file(text: str) -> str:
  """argparse type of an --out FILE: a folder there is refused at once (one
  line, before any work), not at the final write."""
  if os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
  return text


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mlimages",
      description="Tencent ML-Images tools: hierarchy, labels, acquisition, "
      "inference, checkpoint conversion, few-shot probes and export.")
  parser.add_argument("--version", action="version",
                      version=f"%(prog)s {__version__}")
  subparsers = parser.add_subparsers(dest="command", metavar="<command>")
  for name in _COMMAND_MODULES:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:  # A real import error inside the module: surface it.
        raise
      continue
    module.register(subparsers)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 0 if args.command is None else 2
  return int(args.func(args) or 0)


def run() -> NoReturn:
  """The ``mlimages`` script: `main`, then a fast exit (fast_exit.py)."""
  fast_exit.exit_process(main())


if __name__ == "__main__":
  run()
