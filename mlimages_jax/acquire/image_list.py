"""Release lists (``<key> <index:confidence>...`` per line): reading, sharding.

The key is a URL (Open Images part) or an ImageNet ID. Lists have millions of
lines, so they are streamed in passes rather than held in memory; shards are
contiguous line ranges, so shard outputs concatenate back into input order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator

from mlimages_jax import fileio
from mlimages_jax.data import annotations as annotations_lib


@dataclasses.dataclass(frozen=True, slots=True)
class ListItem:
  """One list line: its 1-based line number, key (URL or ID) and annotations.

  ``annotations`` is the line's text after the key, exactly as written, so the
  output list carries the input's annotations through byte for byte.
  """
  lineno: int
  key: str
  annotations: str


class ListReader:
  """Streams a release list, validating every line with
  ``annotations.parse_line``.

  Malformed lines raise ``annotations.LabelError`` (file:line) unless
  ``skip_invalid``; then they are skipped and counted in ``invalid``.
  Reading twice yields the same items: the tools make several passes rather
  than hold millions of lines in memory, and only the first pass pays for
  validation (later passes skip the lines it rejected).
  """

  def __init__(self, path: str, *, skip_invalid: bool = False,
               num_classes: int | None = None):
    self.path = os.fspath(path)
    self.skip_invalid = skip_invalid
    self.num_classes = num_classes
    self.num_lines = 0
    self._invalid_lines: set[int] | None = None  # Known after one pass.

  @classmethod
  def with_known_invalid(cls, path: str, invalid_lines: set[int]
                         ) -> ListReader:
    """A reader for a list already validated (by another process)."""
    reader = cls(path, skip_invalid=True)
    reader._invalid_lines = set(invalid_lines)
    return reader

  @property
  def invalid_lines(self) -> set[int]:
    """Line numbers of the malformed lines skipped (after one pass)."""
    return self._invalid_lines or set()

  @property
  def invalid(self) -> int:
    return len(self.invalid_lines)

  def __iter__(self) -> Iterator[ListItem]:
    validate = self._invalid_lines is None
    invalid = set() if validate else self._invalid_lines
    lineno = 0
    with open(self.path, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        if not validate and lineno in invalid:
          continue
        try:
          line = fileio.decode_line(raw, self.path, lineno,
                                    annotations_lib.LabelError).rstrip("\n")
        except annotations_lib.LabelError:
          if not self.skip_invalid:
            raise
          invalid.add(lineno)
          continue
        if not line.strip():
          continue
        if validate:
          try:
            annotations_lib.parse_line(line, num_classes=self.num_classes,
                                       source=self.path, lineno=lineno)
          except annotations_lib.LabelError:
            if not self.skip_invalid:
              raise
            invalid.add(lineno)
            continue
        body = line.lstrip()
        key = body.split(None, 1)[0]
        annotations = body[len(key):].lstrip(" \t")
        yield ListItem(lineno, key, annotations)
    if validate:
      self._invalid_lines = invalid
      self.num_lines = lineno


def parse_shard(spec: str) -> tuple[int, int]:
  """``"I/N"`` (0-based I) -> (I, N); shards are contiguous line ranges."""
  m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
  if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
    raise ValueError(f"--shard must be I/N with 0 <= I < N, got {spec!r}")
  return int(m.group(1)), int(m.group(2))


def shard_range(num_lines: int, shard: tuple[int, int]) -> tuple[int, int]:
  """Line numbers [first, last] (1-based, inclusive) owned by ``shard``.

  Contiguous blocks: concatenating the shards' im_list.txt files in shard
  order gives the input order.
  """
  index, count = shard
  return index * num_lines // count + 1, (index + 1) * num_lines // count

