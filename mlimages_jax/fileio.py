"""Paths and atomic file writes shared by every tool, local or remote.

Every path a user gives (a workdir, a data_dir, a checkpoint, an output) may
be local or a URI such as ``gs://bucket/run``, as flax and big_vision users
expect. They all go through `etils.epath` (`as_path`), which sends URIs to
tf.io.gfile (GCS, S3 via TF's plugins) and local paths to the OS.

A result file appears complete or not at all, with what each kind of storage
offers:

- local disk: a temporary file in the same directory, fsync'ed, then renamed
  over the target (an atomic rename);
- an object store (``gs://``, ``s3://``): no rename (GCS "renames" by copy and
  delete), but every object is written then committed: it becomes visible
  only once its upload completes, and never half-written. The content is
  therefore buffered and uploaded in one write, only if the writer's body
  succeeded; a failure or a kill before that leaves the previous object.

An interrupted or failed run thus never leaves a truncated file that a later
step (or a resumed run) would trust. Kept free of heavy imports so the label
tools start fast (epath loads TensorFlow only when a URI is used).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import tempfile
from typing import IO, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URI (``gs://...``) rather than a local path."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """The one way to open a user's path: local, or remote through epath.

  Local paths are made absolute (Orbax requires it; a later chdir cannot
  move them).
  """
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.fspath(path)))


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "w",
                  **open_kwargs) -> Iterator[IO]:
  """A file that replaces `path` only on success (see the module docstring)."""
  if is_remote(path):
    with _object_writer(as_path(path), mode, **open_kwargs) as f:
      yield f
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def _object_writer(path: epath.Path, mode: str,
                   **open_kwargs) -> Iterator[IO]:
  """Buffers the content, then writes the object in one upload (a commit)."""
  buffer = io.BytesIO()
  if "b" in mode:
    yield buffer
  else:
    text = io.TextIOWrapper(buffer, **open_kwargs)
    yield text
    text.flush()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


class OutputPathError(OSError):
  """An output folder a user gave cannot be written (a file, no permission)."""


def writable_directory(path: PathLike, what: str) -> epath.Path:
  """Creates the folder `path` if missing and checks that files can be
  created in it, so that a bad one stops a job in one line before any work
  rather than at its first save. A remote folder is only created (probing
  an object store costs a write). `what` names it in the error, e.g.
  "--workdir"."""
  path = as_path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not is_remote(path):
      fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    reason = ("is a file, not a folder" if path.is_file() else
              f"cannot be written ({e.strerror or e})")
    raise OutputPathError(f"{what} {path} {reason}") from None
  return path


def append_text(path: PathLike, text: str) -> None:
  """Appends `text` to a log file (created if missing).

  Object stores cannot append: there the object is read and written again
  whole, atomically (fine for a run's log of a few thousand lines).
  """
  if is_remote(path):
    path = as_path(path)
    old = path.read_text() if path.exists() else ""
    with atomic_writer(path) as f:
      f.write(old + text)
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(text)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *,
                     overwrite: bool = False) -> Iterator[pathlib.Path]:
  """A temporary directory that becomes `path` (local) only if the block
  succeeds; an existing `path` is replaced only then, with `overwrite`."""
  path = pathlib.Path(path).resolve()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.",
                                      dir=path.parent))
  try:
    yield tmp
    if path.exists():
      old = path.with_name(f".{path.name}.old-{os.getpid()}")
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
