"""Many annotation lines at once, in CSR form: `LabelBatch`, `LabelFormatter`.

The per-line rules of `annotations` applied to thousands of lines at once:
labels are CSR (``indptr``, ``indices``, ``confidences``), keys stay spans of
the read buffer, and formatting is one gather over a table of formatted
tokens, with no Python object per output byte.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mlimages_jax.data.annotations import Row
from mlimages_jax.data.annotations import format_confidence
from mlimages_jax.data.annotations import format_line


@dataclasses.dataclass(frozen=True)
class LabelBatch:
  """Consecutive annotation lines of one file in CSR form.

  Row r is the line `linenos[r]`; its key is the bytes
  ``buffer[key_starts[r]:key_ends[r]]`` and its labels are
  ``indices[indptr[r]:indptr[r + 1]]`` (ascending, unique) with the aligned
  `confidences`. Keys stay as spans of the read buffer: a Python string is
  made only for the rows asked for.
  """

  buffer: np.ndarray  # uint8
  key_starts: np.ndarray  # int64 [R]
  key_ends: np.ndarray  # int64 [R]
  linenos: np.ndarray  # int64 [R]
  indptr: np.ndarray  # int64 [R + 1]
  indices: np.ndarray  # int32
  confidences: np.ndarray  # float32

  def __len__(self) -> int:
    return len(self.key_starts)

  def key(self, r: int) -> str:
    return self.buffer[self.key_starts[r]:self.key_ends[r]].tobytes().decode(
        "utf-8", "surrogateescape")

  def row(self, r: int) -> Row:
    a, b = self.indptr[r], self.indptr[r + 1]
    return self.key(r), self.indices[a:b], self.confidences[a:b]


class LabelFormatter:
  """Formats closed label sets (CSR) as ``\t<index>:<confidence>...\n`` lines.

  It keeps a table with one zero-padded, fixed-width row per (confidence,
  class) token, built for a confidence on its first use (`num_classes` rows
  per distinct confidence). A batch is then one row gather and one pass that
  drops the padding: no Python object, and no index, per output byte.
  Batches with more distinct confidences than `max_tables` (raw model
  scores, say) are formatted line by line with `format_line`.
  """

  def __init__(self, num_classes: int, max_tables: int = 256):
    self.num_classes = num_classes
    self.max_tables = max_tables
    self._values = np.zeros(0, np.float32)  # Sorted confidences with tables.
    self._block = np.zeros(0, np.int64)  # Their table blocks.
    self._rows = np.frombuffer(b"\n", np.uint8).reshape(1, 1)  # 0: newline.

  def format(self, indptr: np.ndarray, indices: np.ndarray,
             confidences: np.ndarray) -> bytes:
    num_rows = len(indptr) - 1
    blocks = self._blocks(confidences)
    if blocks is None:
      return "".join(
          format_line("", indices[a:b], confidences[a:b]) + "\n"
          for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())).encode()
    tokens = np.zeros(len(indices) + num_rows, np.int64)  # 0: newline.
    is_label = np.ones(len(tokens), bool)
    is_label[indptr[1:] + np.arange(num_rows)] = False
    tokens[is_label] = 1 + blocks * self.num_classes + indices
    width = self._rows.shape[1]
    text = self._rows.view(f"V{width}").reshape(-1)[tokens].view(np.uint8)
    return text[text != 0].tobytes()

  def _blocks(self, conf: np.ndarray) -> np.ndarray | None:
    """Each entry's table block; builds missing ones (None: too many)."""
    pos = np.minimum(np.searchsorted(self._values, conf),
                     max(len(self._values) - 1, 0))
    if len(self._values) and (self._values[pos] == conf).all():
      return self._block[pos]
    if not len(conf):
      return np.zeros(0, np.int64)
    new = np.setdiff1d(conf, self._values)
    if len(self._values) + len(new) > self.max_tables:
      return None
    for value in new.tolist():
      self._add_block(value)
    return self._blocks(conf)

  def _add_block(self, value: float) -> None:
    text = format_confidence(value)
    tokens = [f"\t{i}:{text}".encode() for i in range(self.num_classes)]
    width = max(self._rows.shape[1], max(map(len, tokens)))
    rows = np.zeros((len(self._rows) + len(tokens), width), np.uint8)
    rows[:len(self._rows), :self._rows.shape[1]] = self._rows
    rows[len(self._rows):] = np.frombuffer(
        b"".join(t.ljust(width, b"\0") for t in tokens),
        np.uint8).reshape(-1, width)
    self._rows = rows
    order = np.argsort(np.append(self._values, np.float32(value)),
                       kind="stable")
    self._values = np.append(self._values, np.float32(value))[order]
    self._block = np.append(self._block, len(self._block))[order]
