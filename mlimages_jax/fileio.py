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
step (or a resumed run) would trust; the temporary files of a killed run
(named ``.<name>.<pid>.<random>.tmp``) are removed by the next write of the
same output. Results get the permissions any file of the user gets (0666 and
directories 0777, less the umask; a rewrite keeps the replaced file's mode),
not mkstemp's private 0600.

No output may be, contain or sit inside an input of the same command
(`check_disjoint`), and ``--overwrite`` replaces a directory only if it holds
the marker file that the command writes (`atomic_directory`): a typo'd
``--out`` never deletes a run or the data it reads.

Kept free of heavy imports so the label tools start fast (epath loads
TensorFlow only when a URI is used).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Union

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


class OverlapError(ValueError):
  """An output that is, contains or sits inside an input of the command."""


def _resolved(path: PathLike) -> str:
  """Comparable form: symlinks resolved locally, '/'-normalised for URIs."""
  if is_remote(path):
    return os.fspath(path).rstrip("/")
  return os.path.realpath(os.fspath(path))


def _within(inner: str, outer: str) -> bool:
  return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_disjoint(inputs: Mapping[str, PathLike | None],
                   outputs: Mapping[str, PathLike | None], *,
                   in_place: bool = False) -> None:
  """Refuses outputs that are, contain or sit inside an input.

  `inputs` and `outputs` map how the user named each path (``--checkpoint``,
  ``--out``) to the path; None entries are ignored. With `in_place`, an
  output may be the very file it was read from (replaced atomically once
  read), never a folder around or inside an input. Raises OverlapError with
  a one-line message naming both.
  """
  ins = [(name, p, _resolved(p)) for name, p in inputs.items()
         if p is not None]
  for out_name, out in outputs.items():
    if out is None:
      continue
    target = _resolved(out)
    for in_name, path, source in ins:
      if in_place and target == source and not os.path.isdir(source):
        continue
      if target == source:
        how = "is"
      elif _within(target, source):
        how = "is inside"
      elif _within(source, target):
        how = "contains"
      else:
        continue
      raise OverlapError(
          f"{out_name} {os.fspath(out)} {how} the input {in_name} "
          f"{os.fspath(path)}: refusing to write over an input")


def _umask() -> int:
  """The process's umask, read without changing it where Linux allows."""
  with contextlib.suppress(OSError, ValueError):
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  mask = os.umask(0o077)  # Elsewhere: set and restore at once.
  os.umask(mask)
  return mask


def _mode(path: PathLike, new: int) -> int:
  """The mode a result at `path` gets: the replaced one's, or `new` less the
  umask (the mode open() or mkdir() would give it)."""
  try:
    return stat.S_IMODE(os.stat(path).st_mode)
  except FileNotFoundError:
    return new & ~_umask()


def _temp_prefix(path: pathlib.Path) -> str:
  """Our temporary names for `path`: ``.<name>.<pid>.`` + random (+ .tmp)."""
  return f".{path.name}.{os.getpid()}."


def _remove_stale_temps(path: pathlib.Path) -> None:
  """Removes the temporaries that killed processes left for `path`.

  Only names that this module makes for this very output, and only those
  of processes that no longer run (a live writer's are left alone).
  """
  # mkstemp/mkdtemp's random part is [a-z0-9_]; "old": atomic_directory's.
  pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[a-z0-9_]+"
                       rf"(\.tmp)?")
  with contextlib.suppress(FileNotFoundError):
    for entry in os.scandir(path.parent):
      match = pattern.fullmatch(entry.name)
      if match is None or _is_running(int(match.group(1))):
        continue
      if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(entry.path)


def _is_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


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
  _remove_stale_temps(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path),
                             suffix=".tmp")
  try:
    os.fchmod(fd, _mode(path, 0o666))
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


class FolderInUseError(OSError):
  """Another live process holds the folder (`exclusive_use`)."""


LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive_use(folder: PathLike, what: str) -> Iterator[None]:
  """Holds an exclusive lock on ``<folder>/.lock`` for the block, so that a
  second job writing into the same folder (another terminal, a notebook's
  forgotten background run) stops at once, naming the holder, instead of
  interleaving its checkpoints and logs with this one's. The kernel drops
  the lock when the holder dies, even by SIGKILL: nothing stale to clean.
  Object stores have no locks: there the block runs unguarded.
  """
  if is_remote(folder):
    yield
    return
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)

  path = os.path.join(folder, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
      raise FolderInUseError(
          f"{what} {folder} is in use by another run"
          f"{f' ({holder})' if holder else ''}: wait for it to end or stop "
          "it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n"
              .encode(), 0)
    yield
  finally:
    os.close(fd)


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
def atomic_directory(path: str | os.PathLike[str], *, marker: str,
                     overwrite: bool = False) -> Iterator[pathlib.Path]:
  """A temporary directory that becomes `path` (local) only if the block
  succeeds.

  `marker` names a file the block writes into the directory, one only this
  command writes: an existing `path` is replaced (with `overwrite`, and
  only once the block succeeded) if it holds that file, so ``--overwrite``
  replaces an earlier output of the command and nothing else.
  """
  path = pathlib.Path(path).resolve()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")
  if path.exists() and not (path / marker).is_file():
    raise FileExistsError(
        f"{path} exists and was not written by this command (no {marker} "
        "in it): refusing to replace it, even with --overwrite")
  path.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_temps(path)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(path),
                                      dir=path.parent))
  try:
    os.chmod(tmp, _mode(path, 0o777))
    yield tmp
    if path.exists():
      old = path.with_name(f"{_temp_prefix(path)}old")
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
