"""ML-Images annotation lines: the format, one line at a time.

A line is a key (ImageNet member name, URL or file name) followed by
``index:confidence`` tokens separated by TABs or spaces; a bare index means
confidence 1 and -1 means "ignore this class for this image".

`parse_line` and `format_line` are the rules, simple and obviously right.
The batch path (`annotation_reader`, `label_batch`) applies them to
thousands of lines at once and hands any line it does not recognise to
`parse_line`, which either parses it or raises the error, so both accept
exactly the same inputs. A class given twice keeps its highest confidence:
`reduce_max`, here because `parse_line` needs it, and shared by the batch
path, the closure and the co-occurrence expansion.
"""

from __future__ import annotations

import functools
import re

import numpy as np

WHITESPACE = re.compile(r"[ \t\r\n\v\f]+")
_INT32_LIMIT = 2**31
MAX_EXAMPLES = 20  # Invalid-line messages kept for the summary.

Row = tuple[str, np.ndarray, np.ndarray]


class LabelError(ValueError):
  """A malformed annotation line; the message starts with ``<file>:<line>:``."""

  def __init__(self, source: str, lineno: int, message: str):
    super().__init__(f"{source}:{lineno}: {message}")
    self.source = source
    self.lineno = lineno
    self.message = message

  def __reduce__(self):  # Rebuilt from its parts: it crosses processes.
    return type(self), (self.source, self.lineno, self.message)


def parse_line(line: str, *, num_classes: int | None = None,
               source: str = "<string>", lineno: int = 0) -> Row:
  """Parses one line into (key, sorted unique indices, confidences)."""
  tokens = WHITESPACE.split(line.strip(" \t\r\n\v\f"))
  if not tokens[0]:
    raise LabelError(source, lineno, "empty line")
  indices, confidences = [], []
  for token in tokens[1:]:
    index_s, colon, conf_s = token.partition(":")
    try:
      index = int(index_s)
      conf = float(conf_s) if colon else 1.0
    except ValueError:
      raise LabelError(source, lineno, f"bad annotation {token!r}: expected "
                       "index or index:confidence") from None
    if index < 0 or index >= (num_classes or _INT32_LIMIT):
      bound = num_classes or _INT32_LIMIT
      raise LabelError(source, lineno,
                       f"class index {index} out of range 0..{bound - 1}")
    if not -1.0 <= conf <= 1.0:  # Also rejects NaN.
      raise LabelError(source, lineno, f"confidence {conf_s!r} of class "
                       f"{index} outside [-1, 1]")
    indices.append(index)
    confidences.append(conf)
  idx = np.array(indices, np.int32)
  conf = np.array(confidences, np.float32)
  _, idx, conf = reduce_max(np.zeros(len(idx), np.int64), idx, conf,
                                  1, int(idx.max(initial=0)) + 1)
  return tokens[0], idx, conf


@functools.lru_cache(maxsize=65536)
def format_confidence(conf: float) -> str:
  """Shortest text that reads back as the same float32 ("1", "0.9", "-1")."""
  return np.format_float_positional(np.float32(conf), trim="-")


def format_line(key: str, indices: np.ndarray, confidences: np.ndarray) -> str:
  """The TAB-separated line (no newline) that `parse_line` reads back."""
  tokens = [f"{int(i)}:{format_confidence(float(c))}"
            for i, c in zip(indices, confidences)]
  return "\t".join([key] + tokens)


def _sortable(conf: np.ndarray) -> np.ndarray:
  """float32 -> uint32 in the same order (flip negatives, set the sign bit)."""
  bits = np.asarray(conf, np.float32).view(np.uint32)
  return bits ^ np.where(bits >> 31, np.uint32(0xFFFFFFFF),
                         np.uint32(0x80000000))


def _unsortable(key: np.ndarray) -> np.ndarray:
  bits = key ^ np.where(key >> 31, np.uint32(0x80000000),
                        np.uint32(0xFFFFFFFF))
  return bits.view(np.float32)


def reduce_max(rows: np.ndarray, classes: np.ndarray, confs: np.ndarray,
                num_rows: int, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Sorts (row, class) pairs and keeps the highest confidence of each: CSR.

  One in-place sort of uint64 keys (row, class, order-preserving confidence
  bits) replaces a lexsort; the last entry of each (row, class) group is its
  max. Few passes and no avoidable copies: this is the closure's hot path.
  """
  group = np.multiply(rows, num_classes, dtype=np.int64)
  group += classes
  if num_rows * num_classes < 2**32:
    packed = group.view(np.uint64)
    packed <<= np.uint64(32)
    packed |= _sortable(confs)
    packed.sort()
    group = (packed >> np.uint64(32)).view(np.int64)
    last = np.ones(len(group), bool)
    np.not_equal(group[1:], group[:-1], out=last[:-1])
    group = group[last]
    confs = _unsortable(packed[last].astype(np.uint32))  # The low half.
  else:
    order = np.lexsort((confs, group))
    group, confs = group[order], confs[order]
    last = np.ones(len(group), bool)
    np.not_equal(group[1:], group[:-1], out=last[:-1])
    group, confs = group[last], confs[last].astype(np.float32)
  rows, classes = np.divmod(group, num_classes)
  indptr = np.zeros(num_rows + 1, np.int64)
  np.cumsum(np.bincount(rows, minlength=num_rows), out=indptr[1:])
  return (indptr, classes.astype(np.int32),
          np.ascontiguousarray(confs, np.float32))

