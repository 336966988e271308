"""Shared test fixtures.

Tests that read the original project's files find them through the
``MLIMAGES_SHARED_DIR`` environment variable (default ``../shared/ml-images``
next to the repository). Those files are never copied into the project; tests
that need them are skipped, with the reason, when the folder is absent.
"""

from __future__ import annotations

import os
import pathlib

# 8 host devices let pmap tests run on a CPU-only machine. XLA reads the flag
# when JAX initialises its backend, so it must be set before any test imports JAX.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_ml_images_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(
      "MLIMAGES_SHARED_DIR", REPO_ROOT.parent / "shared" / "ml-images"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """The original project's files (real hierarchy, tiny lists, photos, TFRecords)."""
  path = shared_ml_images_dir()
  if not (path / "dictionary_and_semantic_hierarchy.txt").is_file():
    pytest.skip(f"original ML-Images files not found in {path} "
                "(set MLIMAGES_SHARED_DIR)")
  return path


@pytest.fixture(scope="session")
def real_hierarchy_path(shared_dir: pathlib.Path) -> pathlib.Path:
  return shared_dir / "dictionary_and_semantic_hierarchy.txt"
