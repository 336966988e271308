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
from collections.abc import Callable, Iterable
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


# ---- Text inputs as people make them ------------------------------------------
#
# Every reader of a user's text file (hierarchy, annotation and image lists,
# dictionaries, mappings) goes through `open_text` or `decode_line`: a UTF-8
# BOM at the start is dropped, CRLF reads as LF, and bytes that are not UTF-8
# raise the reader's own error naming the file and line. Remote text is read
# by `read_url`: a total deadline and a size cap, not just a per-read timeout.

UTF8_BOM = b"\xef\xbb\xbf"
REMOTE_DEADLINE_S = 120.0
REMOTE_MAX_BYTES = 256 << 20


class TextInputError(ValueError):
  """A text input that cannot be read; the message starts with file:line."""

  def __init__(self, source: str, lineno: int, message: str):
    super().__init__(f"{source}:{lineno}: {message}")
    self.source = source
    self.lineno = lineno


# (source, line number, message) -> the reader's exception (e.g. LabelError).
LineError = Callable[[str, int, str], Exception]


def decode_line(raw: bytes, source: str, lineno: int,
                error: LineError = TextInputError) -> str:
  """One line of a UTF-8 text input: BOM dropped (line 1), CRLF -> LF."""
  if lineno == 1 and raw.startswith(UTF8_BOM):
    raw = raw[len(UTF8_BOM):]
  if raw.endswith(b"\r\n"):
    raw = raw[:-2] + b"\n"
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise error(source, lineno, f"not UTF-8: byte 0x{raw[e.start]:02x} at "
                f"column {e.start + 1} ({raw[:60]!r})") from None


def decode_lines(lines: Iterable[bytes], source: str,
                 error: LineError = TextInputError) -> Iterator[str]:
  """`decode_line` over lines of bytes (a binary file, a decompressor)."""
  for lineno, raw in enumerate(lines, start=1):
    yield decode_line(raw, source, lineno, error)


@contextlib.contextmanager
def open_text(path: PathLike, error: LineError = TextInputError
              ) -> Iterator[Iterator[str]]:
  """`open(path, encoding="utf-8")` for a user's text file, local or remote:
  its lines, read by `decode_line` (so "\n"-terminated, BOM dropped)."""
  with (as_path(path).open("rb") if is_remote(path)
        else open(path, "rb")) as f:
    yield decode_lines(f, os.fspath(path), error)


class RemoteReadError(OSError):
  """A URL whose body did not arrive in time or is larger than allowed."""


def read_url(url: str, *, deadline: float = REMOTE_DEADLINE_S,
             max_bytes: int = REMOTE_MAX_BYTES) -> bytes:
  """The body of an http(s) URL within `deadline` seconds and `max_bytes`.

  urllib's timeout bounds each socket read, so a server that trickles its
  body never times out; here the whole transfer has a deadline (checked
  after every read, each read waiting at most `deadline`) and a size cap.
  """
  import time  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top

  start = time.monotonic()
  with urllib.request.urlopen(url, timeout=deadline) as response:
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
      raise RemoteReadError(f"{url}: {int(length):,} bytes, more than the "
                            f"{max_bytes:,} allowed")
    chunks, size = [], 0
    while chunk := response.read1(1 << 16):
      size += len(chunk)
      if size > max_bytes:
        raise RemoteReadError(f"{url}: more than the {max_bytes:,} bytes "
                              "allowed")
      if time.monotonic() - start > deadline:
        raise RemoteReadError(f"{url}: not complete after {deadline:g} s "
                              f"({size:,} bytes received)")
      chunks.append(chunk)
  return b"".join(chunks)
