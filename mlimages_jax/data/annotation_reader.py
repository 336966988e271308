"""Streaming, vectorised parsing of annotation files into `LabelBatch`es.

Files (``.gz`` too) are read in chunks of whole lines, so memory is bounded
whatever their length; the byte-level tokenising is vectorised in NumPy. Any
line the tokeniser does not recognise is handed to `annotations.parse_line`,
which either parses it or raises the error, so both accept exactly the same
inputs. `open_binary` and `compressed_writer` are the ``.gz``-aware ends that
the whole-file tools (augment, remap) share.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from typing import BinaryIO, Callable, Generator, Iterator

import numpy as np

from mlimages_jax.fileio import UTF8_BOM
from mlimages_jax.fileio import PathLike
from mlimages_jax.fileio import decode_line
from mlimages_jax.data.annotations import LabelError
from mlimages_jax.data.annotations import MAX_EXAMPLES
from mlimages_jax.data.annotations import Row
from mlimages_jax.data.annotations import parse_line
from mlimages_jax.data.annotations import reduce_max
from mlimages_jax.data.label_batch import LabelBatch

_MAX_INDEX_DIGITS = 9
_WINDOW = 16  # Bytes of a label token read at once; longer: slow path.
_POSITIONS = np.arange(_WINDOW)
_BYTE_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [2**64 - 1],
                       np.uint64)


def open_binary(path: PathLike) -> tuple[BinaryIO, BinaryIO]:
  """(stream of the uncompressed bytes, raw file) — `.gz` is decompressed."""
  raw = open(path, "rb")
  if str(path).endswith(".gz"):
    return gzip.GzipFile(fileobj=raw, mode="rb"), raw
  return raw, raw


def compressed_writer(raw: BinaryIO, path: PathLike):
  """A gzip writer over `raw` for a `.gz` path, else `raw` itself."""
  if str(path).endswith(".gz"):
    return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6)
  return contextlib.nullcontext(raw)


def whole_lines(path: PathLike, chunk_bytes: int
                ) -> Iterator[tuple[bytes, int]]:
  """(chunk, bytes read): chunks of whole lines, each ending with a newline.

  Chunks hold about `chunk_bytes` (more for longer lines); a missing final
  newline is added. Bytes read count the file on disk (compressed for
  ``.gz``), for progress bars.
  """
  stream, raw = open_binary(path)
  with stream, raw:
    carry = b""
    if stream.peek(len(UTF8_BOM))[:len(UTF8_BOM)] == UTF8_BOM:
      stream.read(len(UTF8_BOM))  # Else it would be part of the first key.
    while True:
      data = stream.read(chunk_bytes)
      if not data:
        if carry:
          yield carry + b"\n", raw.tell()
        return
      data = carry + data
      end = data.rfind(b"\n") + 1
      if end == 0:  # A line longer than the chunk: keep reading.
        carry = data
        continue
      carry = data[end:]
      yield data[:end], raw.tell()


class AnnotationReader:
  """Streams an annotation file as rows or as `LabelBatch`es.

  Memory is bounded by `chunk_bytes` whatever the file length. Invalid lines
  raise `LabelError` (file:line), or, with `skip_invalid`, are skipped and
  counted in `num_invalid` (the first messages kept in `invalid_examples`).
  Blank lines are ignored.
  """

  def __init__(self, path: PathLike, *, num_classes: int | None = None,
               skip_invalid: bool = False, chunk_bytes: int = 1 << 17):
    self.path = path
    self.source = str(path)
    self.num_classes = num_classes
    self.skip_invalid = skip_invalid
    self.chunk_bytes = chunk_bytes
    self.num_rows = 0
    self.num_invalid = 0
    self.invalid_examples: list[str] = []
    self.total_bytes = os.path.getsize(path)
    self.bytes_read = 0  # Of the file on disk (compressed for .gz).
    self._rows: Iterator[Row] | None = None
    self._confidences = ConfidenceTexts()

  def __iter__(self) -> AnnotationReader:
    return self

  def __next__(self) -> Row:
    if self._rows is None:
      self._rows = (b.row(r) for b in self.batches() for r in range(len(b)))
    return next(self._rows)

  def batches(self) -> Iterator[LabelBatch]:
    first_lineno = 1
    for chunk, self.bytes_read in whole_lines(self.path, self.chunk_bytes):
      first_lineno += yield from self._parse(chunk, first_lineno)

  def _parse(self, chunk: bytes, first_lineno: int
             ) -> Generator[LabelBatch, None, int]:
    """Yields the chunk's batch (if any line has a key); returns its lines."""
    chunk = utf8_lines(chunk, first_lineno, self.source,
                       self._on_invalid if self.skip_invalid else None)
    batch, num_lines = parse_chunk(
        chunk, first_lineno, self.num_classes, self.source,
        self._on_invalid if self.skip_invalid else None, self._confidences)
    self.num_rows += len(batch)
    if len(batch):
      yield batch
    return num_lines

  def _on_invalid(self, error: LabelError) -> None:
    self.num_invalid += 1
    if len(self.invalid_examples) < MAX_EXAMPLES:
      self.invalid_examples.append(str(error))


def read_annotation_file(path: PathLike, *, num_classes: int | None = None,
                         skip_invalid: bool = False) -> AnnotationReader:
  """An iterator of (key, indices, confidences); see `AnnotationReader`."""
  return AnnotationReader(path, num_classes=num_classes,
                          skip_invalid=skip_invalid)


def utf8_lines(chunk: bytes, first_lineno: int, source: str,
               on_invalid: Callable[[LabelError], None] | None) -> bytes:
  """`chunk` (whole lines), checked to be UTF-8 (one pass, no copy if so).

  A line that is not raises LabelError (file:line, `fileio.decode_line`'s
  message), or with `on_invalid` is passed to it and blanked: skipped and
  counted like any invalid line (keys are otherwise kept as raw bytes).
  """
  while True:
    try:
      chunk.decode("utf-8")
      return chunk
    except UnicodeDecodeError as e:
      begin = chunk.rfind(b"\n", 0, e.start) + 1
      end = chunk.index(b"\n", e.start)
      try:
        decode_line(chunk[begin:end], source,
                    first_lineno + chunk.count(b"\n", 0, begin), LabelError)
      except LabelError as error:
        if on_invalid is None:
          raise
        on_invalid(error)
      chunk = chunk[:begin] + b" " * (end - begin) + chunk[end:]


def parse_chunk(chunk: bytes, first_lineno: int | np.ndarray,
                num_classes: int | None, source: str,
                on_invalid: Callable[[LabelError], None] | None,
                confidences: ConfidenceTexts) -> tuple[LabelBatch, int]:
  """Tokenises whole lines (`chunk` ends with a newline) with NumPy.

  `first_lineno` numbers the chunk's lines consecutively from it, or, as an
  array, gives each line's number (lines gathered from across a file).
  Returns the batch and the number of lines the chunk held.
  """
  padded = np.frombuffer(chunk + bytes(_WINDOW), np.uint8)
  buf = padded[:len(chunk)]
  sep = ((buf - np.uint8(9)) <= 4) | (buf == 32)  # `annotations.WHITESPACE`.
  # +1/-1 where separators turn into a token and back: starts and ends
  # alternate, because the chunk ends with a newline.
  change = np.empty(len(buf), bool)
  change[0] = not sep[0]
  np.not_equal(sep[1:], sep[:-1], out=change[1:])
  edges = np.flatnonzero(change)
  starts, ends = edges[0::2], edges[1::2]
  newline = buf == 10
  line_ends = np.flatnonzero(newline)
  token_line = np.searchsorted(line_ends, starts)
  is_key = np.ones(len(starts), bool)
  np.not_equal(token_line[1:], token_line[:-1], out=is_key[1:])
  key_pos = np.flatnonzero(is_key)
  row_of_token = np.cumsum(is_key) - 1
  labels = np.flatnonzero(~is_key)
  num_rows = len(key_pos)
  row_line = token_line[key_pos]
  line_numbers = first_lineno + np.arange(len(line_ends)) if np.ndim(
      first_lineno) == 0 else first_lineno

  idx, conf, bad = _parse_tokens(padded, starts[labels], ends[labels],
                                 num_classes, confidences)
  label_row = row_of_token[labels]
  keep = np.ones(num_rows, bool)
  replaced: dict[int, tuple[np.ndarray, np.ndarray]] = {}
  for r in (np.unique(label_row[bad]).tolist() if bad.any() else []):
    # Unusual or invalid: parse_line decides, and names the line if invalid.
    line = int(row_line[r])
    begin = int(line_ends[line - 1]) + 1 if line else 0
    text = chunk[begin:int(line_ends[line])].decode("utf-8", "surrogateescape")
    lineno = int(line_numbers[line])
    try:
      _, r_idx, r_conf = parse_line(text, num_classes=num_classes,
                                    source=source, lineno=lineno)
    except LabelError as e:
      if on_invalid is None:
        raise
      on_invalid(e)
      keep[r] = False
      continue
    replaced[r] = (r_idx, r_conf)

  rows = label_row
  if replaced or not keep.all():
    good = ~np.isin(label_row, np.flatnonzero(~keep).tolist() + list(replaced))
    rows, idx, conf = label_row[good], idx[good], conf[good]
  if replaced:
    rows = np.concatenate([rows] + [np.full(len(i), r)
                                    for r, (i, _) in replaced.items()])
    idx = np.concatenate([idx] + [i for i, _ in replaced.values()])
    conf = np.concatenate([conf] + [c for _, c in replaced.values()])
  keep_rows = np.flatnonzero(keep)
  if len(keep_rows) < num_rows:
    rows = (np.cumsum(keep) - 1)[rows]
  width = num_classes or int(idx.max(initial=0)) + 1
  indptr, idx, conf = reduce_max(rows, idx, conf, len(keep_rows), width)
  return LabelBatch(buffer=buf, key_starts=starts[key_pos][keep_rows],
                    key_ends=ends[key_pos][keep_rows],
                    linenos=line_numbers[row_line[keep_rows]],
                    indptr=indptr, indices=idx,
                    confidences=conf), len(line_ends)


def _parse_tokens(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                  num_classes: int | None, confidences: ConfidenceTexts
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Vectorised ``index[:confidence]`` -> (int32, float32, unrecognised mask).

  Each token is read as a 16-byte window (two unaligned uint64 loads, not one
  index per character). The index is accumulated digit by digit across the
  whole batch; a confidence is at most 8 bytes, so its text is one uint64
  and only distinct confidence texts go through `float()` (memoised) —
  exactly what `parse_line` does, once per text. Tokens outside this
  fast form (longer, signs, non-ASCII, ...) are flagged for `parse_line`.
  `buf` must have `_WINDOW` bytes of padding after its last token.
  """
  num = len(starts)
  if num == 0:
    return (np.zeros(0, np.int32), np.zeros(0, np.float32),
            np.zeros(0, bool))
  words = np.ndarray((len(buf) - 7,), np.dtype("<u8"), buffer=buf,
                     strides=(1,))  # Unaligned: a uint64 at every byte.
  window = np.stack([words[starts], words[starts + 8]], axis=1).view(np.uint8)
  lengths = ends - starts
  inside = _POSITIONS < lengths[:, None]
  colon = (window == 58) & inside
  colon_at = np.where(_any_row(colon), colon.argmax(axis=1), lengths)
  has_conf = colon_at < lengths
  colon[np.flatnonzero(has_conf), colon_at[has_conf]] = False
  digits = window - np.uint8(48)
  bad = ((lengths > _WINDOW) | _any_row(colon)  # A second colon.
         | (colon_at < 1) | (colon_at > _MAX_INDEX_DIGITS)
         | _any_row((_POSITIONS < colon_at[:, None]) & (digits > 9))
         | _any_row((window == 0) & inside))
  index = np.zeros(num, np.int64)
  for k in range(_MAX_INDEX_DIGITS):
    index = np.where(k < colon_at, index * 10 + digits[:, k], index)

  conf_len = np.where(has_conf, lengths - colon_at - 1, 0)
  bad |= has_conf & ((conf_len < 1) | (conf_len > 8))
  conf_start = np.minimum(starts + colon_at + 1, len(words) - 1)
  text = words[conf_start] & _BYTE_MASKS[np.clip(conf_len, 0, 8)]
  conf = np.ones(num, np.float32)
  parsed = np.flatnonzero(has_conf & ~bad)
  values, ok = confidences.lookup(text[parsed])
  conf[parsed] = values
  bad[parsed[~ok]] = True
  if num_classes is not None:
    bad |= index >= num_classes
  return index.astype(np.int32), conf, bad


class ConfidenceTexts:
  """Memoised ``float()`` of confidence texts packed little-endian in uint64."""

  _MAX_ENTRIES = 1 << 16  # Raw model scores: start over rather than grow.

  def __init__(self):
    self._words = np.zeros(0, np.uint64)  # Sorted.
    self._values = np.zeros(0, np.float32)
    self._ok = np.zeros(0, bool)

  def lookup(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 values, valid) per word; invalid: not a float in [-1, 1]."""
    if not len(words):
      return np.zeros(0, np.float32), np.zeros(0, bool)
    pos = np.minimum(np.searchsorted(self._words, words),
                     max(len(self._words) - 1, 0))
    if len(self._words) and (self._words[pos] == words).all():
      return self._values[pos], self._ok[pos]
    new = np.unique(words)
    if len(self._words) + len(new) > self._MAX_ENTRIES:
      self.__init__()
    new = np.setdiff1d(new, self._words)
    values = np.zeros(len(new), np.float32)
    ok = np.zeros(len(new), bool)
    for k, word in enumerate(new.tolist()):
      try:
        value = float(word.to_bytes(8, "little").rstrip(b"\0").decode("ascii"))
      except (ValueError, UnicodeDecodeError):
        continue
      ok[k] = -1.0 <= value <= 1.0
      values[k] = value if ok[k] else 0.0
    order = np.argsort(np.concatenate([self._words, new]))
    self._words = np.concatenate([self._words, new])[order]
    self._values = np.concatenate([self._values, values])[order]
    self._ok = np.concatenate([self._ok, ok])[order]
    return self.lookup(words)


def _any_row(mask: np.ndarray) -> np.ndarray:
  """`mask.any(axis=1)` for [T, 16] bool, as two uint64 words per row (fast)."""
  words = np.ascontiguousarray(mask).view(np.uint64)
  return (words[:, 0] | words[:, 1]) != 0
