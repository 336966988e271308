"""Atomic file writes shared by every tool.

A result file appears complete or not at all: it is written to a temporary
file in the same directory, fsync'ed, then renamed over the target. An
interrupted or failed run therefore never leaves a truncated file that a
later step (or a resumed run) would trust. Kept free of heavy imports so the
label tools start fast.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "w",
                  **open_kwargs) -> Iterator[IO]:
  """Opens a temporary file next to `path` that replaces it only on success."""
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
