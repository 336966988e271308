"""A non-local filesystem for the remote-storage tests: TF's ``ram://``.

epath sends URIs to tf.io.gfile, whose GCS and S3 filesystems need the
network; its in-process RAM filesystem (``ram://``) is a real non-local
filesystem (no os/pathlib/open works on it) that the same calls reach.
epath only routes the URI schemes it lists (gs, s3, az, hf), so
`route_ram_through_epath` adds ``ram`` to those tables (TensorFlow's
backend, like ``gs://``). Two quirks of TF's RAM filesystem are corrected
(`_RamBackend`), where GCS and S3 behave as a filesystem should: opening an
existing file for writing appends to it instead of replacing it, and a path
"exists" when it is a mere prefix of another (``f.npy`` of
``f.npy.partial/``). What
``ram://`` cannot show: Orbax writes arrays
through TensorStore, which knows gs:// and local files but not TF's RAM
filesystem, so checkpoints stay local in these tests.
"""

from __future__ import annotations

import os
import uuid

import pytest
from etils.epath import backend
from etils.epath import gpath
from etils.epath import register


class _RamBackend(backend._TfBackend):  # pylint: disable=protected-access
  """tf.io.gfile on ram://, with the semantics of GCS (see above)."""

  def exists(self, path) -> bool:
    parent, name = os.fspath(path).rstrip("/").rsplit("/", 1)
    return (super().exists(path)
            and name in [c.rstrip("/") for c in self.listdir(parent)])

  def isdir(self, path) -> bool:
    return self.exists(path) and super().isdir(path)

  def open(self, path, mode):
    if "w" in mode and self.exists(path):
      self.remove(path)
    return super().open(path, mode)


_RAM_BACKEND = _RamBackend()


class _RamPath(gpath.PosixGPath):
  """``ram://`` paths (epath picks tf.io.gfile for every URI; this one gets
  the corrected backend)."""

  @property
  def _backend(self) -> backend.Backend:
    return _RAM_BACKEND


def route_ram_through_epath(monkeypatch: pytest.MonkeyPatch) -> str:
  """Makes ``epath.Path("ram://...")`` work; returns a fresh ram:// root."""
  monkeypatch.setattr(gpath, "_URI_PREFIXES",
                      gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", _RamPath)
  return f"ram://test-{uuid.uuid4().hex[:12]}"
