"""Installs mlimages-jax from a checkout, keeping the environment's own stack.

Colab (and most GPU or TPU images) come with their own accelerator builds of
jax and tensorflow; a plain `pip install` of this package would replace them
with its CPU pins. This installs only the requirements that no installed
distribution provides (tensorflow satisfies tensorflow-cpu and the reverse),
holds the installed accelerator stacks (jax*, tensorflow*, libtpu, nvidia-*,
torch, keras) at their versions, then the package itself without
dependencies. The notebooks' first cell runs it:

  python notebooks/install.py CHECKOUT [--dry-run]

`--dry-run` resolves and prints what pip would install, changing nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import subprocess
import sys
import tempfile
import tomllib

try:
  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name
except ImportError:  # A bare venv: pip carries its own copy.
  from pip._vendor.packaging.requirements import Requirement
  from pip._vendor.packaging.utils import canonicalize_name

# Distributions that install the same import package.
SAME_MODULE = (
    frozenset({"tensorflow", "tensorflow-cpu", "tensorflow-macos",
               "tf-nightly"}),
    frozenset({"opencv-python", "opencv-python-headless",
               "opencv-contrib-python", "opencv-contrib-python-headless"}),
)
HELD_PREFIXES = ("jax", "tensorflow", "tf-", "libtpu", "nvidia-", "torch",
                 "keras")


def requirements(checkout: pathlib.Path) -> list[Requirement]:
  """The package's runtime requirements and its `notebooks` extra."""
  project = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]
  lines = project["dependencies"] + project["optional-dependencies"][
      "notebooks"]
  return [r for r in map(Requirement, lines)
          if r.marker is None or r.marker.evaluate({"extra": ""})]


def installed_versions() -> dict[str, str]:
  return {canonicalize_name(d.metadata["Name"]): d.version
          for d in importlib.metadata.distributions()}


def plan(needed: list[Requirement], installed: dict[str, str]
         ) -> tuple[list[str], list[str]]:
  """(notes on what is kept, requirements to install)."""
  kept, missing = [], []
  for req in needed:
    name = canonicalize_name(req.name)
    names = next((group for group in SAME_MODULE if name in group), {name})
    present = sorted(n for n in names if n in installed)
    if not present:
      missing.append(str(req))
      continue
    version = installed[present[0]]
    fits = req.specifier.contains(version, prereleases=True)
    kept.append(f"{present[0]} {version}" + (
        "" if fits else f" (kept; this project is tested with {req})"))
  return kept, missing


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("checkout", type=pathlib.Path)
  parser.add_argument("--dry-run", action="store_true")
  args = parser.parse_args(argv)
  installed = installed_versions()
  kept, missing = plan(requirements(args.checkout), installed)
  for note in kept:
    print("keeping", note)
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  if args.dry_run:
    pip.append("--dry-run")
  with tempfile.NamedTemporaryFile("w", suffix=".txt") as held:
    held.write("".join(f"{name}=={version}\n"
                       for name, version in sorted(installed.items())
                       if name.startswith(HELD_PREFIXES)))
    held.flush()
    if missing:
      print("installing", " ".join(missing), flush=True)
      # --report - prints what the resolution chose (JSON) in a dry run.
      report = ["--report", "-"] if args.dry_run else []
      subprocess.run(pip + report + missing + ["-c", held.name], check=True)
  subprocess.run(pip + ["--no-deps", str(args.checkout)], check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
