"""Shared test fixtures.

Tests that read the original project's files find them through the
``MLIMAGES_SHARED_DIR`` environment variable (default ``../shared/ml-images``
next to the repository). Those files are never copied into the project; tests
that need them are skipped, with the reason, when the folder is absent.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import struct
import tempfile
import zlib

# 8 host devices let pmap tests run on a CPU-only machine. XLA reads the flag
# when JAX initialises its backend, so it must be set before any test imports JAX.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_CACHE_KEY = pytest.StashKey[str]()
_COMPILATION_CACHE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def pytest_configure(config: pytest.Config) -> None:
  """One JAX compilation cache for every `main.py`/CLI subprocess of the run.

  Most of a smoke run's time is compiling the same tiny networks (25 s
  cold, 13 s from the cache, measured); with the cache the suite stays
  within its budget on 2 cores. Set here, on the controller, before the
  xdist workers start, so that they and their subprocesses inherit it.
  """
  if (hasattr(config, "workerinput")
      or "JAX_COMPILATION_CACHE_DIR" in os.environ):
    return
  directory = tempfile.mkdtemp(prefix="mlimages-jax-test-cache-")
  config.stash[_CACHE_KEY] = directory
  os.environ.update(_COMPILATION_CACHE, JAX_COMPILATION_CACHE_DIR=directory)


def pytest_unconfigure(config: pytest.Config) -> None:
  directory = config.stash.get(_CACHE_KEY, None)
  if directory:
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _no_compilation_cache_in_the_test_process() -> None:
  """The tests' own compilations stay uncached: tests that check what
  compiles (e.g. nothing before a checkpoint check) must see every one."""
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir", None)


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
def shapes_dir(tmp_path_factory) -> str:
  """synth_shapes (fewshot_helpers.py): single-label `label`, splits train
  and test (no validation), like most public classification datasets."""
  import fewshot_helpers  # noqa: PLC0415  (TensorFlow: only when used)
  return fewshot_helpers.build(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def real_hierarchy_path(shared_dir: pathlib.Path) -> pathlib.Path:
  return shared_dir / "dictionary_and_semantic_hierarchy.txt"


def assert_same_checkpoint(want_workdir: str | os.PathLike[str],
                           got_workdir: str | os.PathLike[str],
                           step: int) -> None:
  """The train states two runs saved at `step` (local or gs://) are
  bit-identical: what every resume test must show."""
  import jax  # noqa: PLC0415  (conftest stays light to import)
  import numpy as np  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415
  want, got = (ocp.StandardCheckpointer().restore(
      epath.Path(workdir) / "checkpoints" / str(step) / "state")
               for workdir in (want_workdir, got_workdir))
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def bomb_png_header(width: int, height: int) -> bytes:
  """A PNG declaring width x height 8-bit RGB with one row of zeros: enough
  for any header reader (never decode it: ~2.7 GB at 30000x30000)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(bytes(3 * width + 1)))
          + chunk(b"IEND", b""))
