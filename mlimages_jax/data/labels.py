"""ML-Images annotation lines: parsing, formatting, streaming and augmentation.

A line is a key (ImageNet member name, URL or file name) followed by
``index:confidence`` tokens separated by TABs or spaces; a bare index means
confidence 1 and -1 means "ignore this class for this image".

Two layers share one set of rules:
- per line (`parse_line`, `format_line`, `augment`): simple and obviously
  right, and `augment` works on Python lists (a few microseconds a row), so
  it also serves the TFDS builder, which augments one example at a time;
- per batch (`LabelBatch`, `AnnotationReader.batches`, `augment_batch`,
  `LabelFormatter`): the same operations on thousands of lines at once in
  CSR form, with the byte-level tokenising, closure and formatting
  vectorised in NumPy. Any line the vectorised tokeniser does not recognise
  is handed to `parse_line`, which either parses it or raises the error, so
  both layers accept exactly the same inputs.

Whole files (`augment_file`) stream in bounded memory through
`ChunkAugmenter`: a compiled kernel (`labels_kernel`, numba, imported only
then) augments chunks of bytes line by line, and hands the lines it cannot
parse exactly (invalid or unusual ones) to the batch path, which formats
them or raises the error; that path keeps a bounded memo from annotation
text to augmented text. `workers` threads share the chunks of one file.
Measured figures (the kernel: ~2-3x the CPU time of merely splitting the
lines; the batch path alone: ~8-12x): benchmarks/labels_bench.py.

Closure rule (`close_over_ancestors`): a class's closed confidence is the
maximum of its own confidence and the positive confidences of its annotated
descendants. So an ancestor gets the highest confidence among its annotated
descendants, a -1 (or 0) never propagates, and an explicit -1 on a class
stays -1 unless a descendant is annotated positive: the hierarchy then states
the class is present, which overrides "unknown".
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import gzip
import importlib.util
import io
import itertools
import multiprocessing
import operator
import os
import re
import threading
import weakref
from typing import TYPE_CHECKING, BinaryIO, Callable, Generator, Iterator

import numpy as np

from mlimages_jax.fileio import PathLike, atomic_writer
from mlimages_jax.data.hierarchy import Hierarchy
from mlimages_jax.data.hierarchy import ragged_arange

if TYPE_CHECKING:
  from mlimages_jax.data.cooccurrence import CooccurrencePairs

_WHITESPACE = re.compile(r"[ \t\r\n\v\f]+")
_MAX_INDEX_DIGITS = 9
_WINDOW = 16  # Bytes of a label token read at once; longer: slow path.
_POSITIONS = np.arange(_WINDOW)
_BYTE_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [2**64 - 1],
                       np.uint64)
_INT32_LIMIT = 2**31
_MAX_EXAMPLES = 20  # Invalid-line messages kept for the summary.
_FIRST, _SECOND, _THIRD = (operator.itemgetter(k) for k in range(3))
_OTHER_SPACE = (b" ", b"\r", b"\v", b"\f")  # Whitespace, apart from TAB.
_MIN_CHUNKS_PER_WORKER = 64

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


# ---- one line ---------------------------------------------------------------


def parse_line(line: str, *, num_classes: int | None = None,
               source: str = "<string>", lineno: int = 0) -> Row:
  """Parses one line into (key, sorted unique indices, confidences)."""
  tokens = _WHITESPACE.split(line.strip(" \t\r\n\v\f"))
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


def close_over_ancestors(hierarchy: Hierarchy, indices: np.ndarray,
                         confidences: np.ndarray) -> tuple[np.ndarray,
                                                           np.ndarray]:
  """Adds every ancestor of the positive labels (rule in the module doc)."""
  return augment(hierarchy, indices, confidences)


def augment(hierarchy: Hierarchy, indices: np.ndarray,
            confidences: np.ndarray, pairs: CooccurrencePairs | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """The full augmentation of one image's labels: co-occurrence, closure.

  The TFDS builder calls this once per example, so it works on Python lists
  and dicts (a few microseconds) rather than on the batch path's arrays,
  whose fixed cost per call is far larger than one row's work; the tests
  check that both give the same result.
  """
  idx = np.asarray(indices, np.int32).reshape(-1)
  conf = np.asarray(confidences, np.float32).reshape(-1)
  if idx.shape != conf.shape:
    raise ValueError(f"{idx.size} indices but {conf.size} confidences")
  if idx.size and not 0 <= idx.min() <= idx.max() < hierarchy.num_classes:
    raise ValueError(f"class indices must be in 0..{hierarchy.num_classes - 1}"
                     f", got {idx.tolist()}")
  best: dict[int, float] = {}
  for i, c in zip(idx.tolist(), conf.tolist()):
    if c > best.get(i, -np.inf):
      best[i] = c
  if pairs is not None:
    for i, c in list(best.items()):
      if c > 0:
        first, last = np.searchsorted(pairs.sources, [i, i + 1])
        for target, pair_conf in zip(pairs.targets[first:last].tolist(),
                                     pairs.confidences[first:last].tolist()):
          added = min(c, pair_conf)
          if added > best.get(target, -np.inf):
            best[target] = added
  ancestors = _ancestor_lists(hierarchy)
  for i, c in list(best.items()):
    if c > 0:
      for a in ancestors[i]:
        if c > best.get(a, -np.inf):
          best[a] = c
  order = sorted(best)
  return (np.array(order, np.int32),
          np.array([best[i] for i in order], np.float32))


_ANCESTOR_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ancestor_lists(hierarchy: Hierarchy) -> list[list[int]]:
  """`hierarchy.ancestors(i)` for every i as Python lists (cached)."""
  lists = _ANCESTOR_LISTS.get(hierarchy)
  if lists is None:
    ptr = hierarchy.ancestor_indptr.tolist()
    flat = hierarchy.ancestor_indices.tolist()
    lists = [flat[a:b] for a, b in zip(ptr[:-1], ptr[1:])]
    _ANCESTOR_LISTS[hierarchy] = lists
  return lists


# ---- many lines at once (CSR) -----------------------------------------------


def close_batch(hierarchy: Hierarchy, indptr: np.ndarray, indices: np.ndarray,
                confidences: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`close_over_ancestors` for every row of a CSR batch at once.

  Rows with a single positive label (most ImageNet rows) copy that class's
  precomputed closed chain; the others go through one sort (`reduce_max`).
  """
  counts = np.diff(indptr)
  first = np.minimum(indptr[:-1], max(len(indices) - 1, 0))
  single = (counts == 1) & (confidences[first] > 0) if len(indices) else (
      np.zeros(len(counts), bool))
  if not single.any():
    return _close_sorting(hierarchy, indptr, indices, confidences)
  rows_1, rows_n = np.flatnonzero(single), np.flatnonzero(~single)
  classes_1, conf_1 = indices[indptr[rows_1]], confidences[indptr[rows_1]]
  chain_ptr, chain_idx = hierarchy.closure_csr
  len_1 = chain_ptr[classes_1 + 1] - chain_ptr[classes_1]
  entries_n = ragged_arange(indptr[rows_n], counts[rows_n])
  ptr_n, idx_n, conf_n = _close_sorting(
      hierarchy, np.concatenate([[0], np.cumsum(counts[rows_n])]),
      indices[entries_n], confidences[entries_n])
  out_counts = np.empty(len(counts), np.int64)
  out_counts[rows_1] = len_1
  out_counts[rows_n] = np.diff(ptr_n)
  out_ptr = np.zeros(len(counts) + 1, np.int64)
  np.cumsum(out_counts, out=out_ptr[1:])
  out_idx = np.empty(out_ptr[-1], np.int32)
  out_conf = np.empty(out_ptr[-1], np.float32)
  at_1 = ragged_arange(out_ptr[rows_1], len_1)
  out_idx[at_1] = chain_idx[ragged_arange(chain_ptr[classes_1], len_1)]
  out_conf[at_1] = np.repeat(conf_1, len_1)
  at_n = ragged_arange(out_ptr[rows_n], out_counts[rows_n])
  out_idx[at_n] = idx_n
  out_conf[at_n] = conf_n
  return out_ptr, out_idx, out_conf


def _close_sorting(hierarchy: Hierarchy, indptr: np.ndarray,
                   indices: np.ndarray, confidences: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  num_rows = len(indptr) - 1
  rows = np.repeat(np.arange(num_rows), np.diff(indptr))
  positive = np.flatnonzero(confidences > 0)
  sources = indices[positive]
  anc_ptr = hierarchy.ancestor_indptr
  counts = anc_ptr[sources + 1] - anc_ptr[sources]
  ancestors = hierarchy.ancestor_indices[ragged_arange(anc_ptr[sources],
                                                       counts)]
  return reduce_max(
      np.concatenate([rows, np.repeat(rows[positive], counts)]),
      np.concatenate([indices, ancestors]),
      np.concatenate([confidences, np.repeat(confidences[positive], counts)]),
      num_rows, hierarchy.num_classes)


def augment_batch(hierarchy: Hierarchy, indptr: np.ndarray,
                  indices: np.ndarray, confidences: np.ndarray, *,
                  pairs: CooccurrencePairs | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`augment` for every row of a CSR batch at once."""
  if pairs is not None:
    indptr, indices, confidences = pairs.expand_batch(indptr, indices,
                                                      confidences)
  return close_batch(hierarchy, indptr, indices, confidences)


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


# ---- streaming files --------------------------------------------------------


def open_binary(path: PathLike) -> tuple[BinaryIO, BinaryIO]:
  """(stream of the uncompressed bytes, raw file) — `.gz` is decompressed."""
  raw = open(path, "rb")
  if str(path).endswith(".gz"):
    return gzip.GzipFile(fileobj=raw, mode="rb"), raw
  return raw, raw


def _compressed(raw: BinaryIO, path: PathLike):
  """A gzip writer over `raw` for a `.gz` path, else `raw` itself."""
  if str(path).endswith(".gz"):
    return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6)
  return contextlib.nullcontext(raw)


def _whole_lines(path: PathLike, chunk_bytes: int
                 ) -> Iterator[tuple[bytes, int]]:
  """(chunk, bytes read): chunks of whole lines, each ending with a newline.

  Chunks hold about `chunk_bytes` (more for longer lines); a missing final
  newline is added. Bytes read count the file on disk (compressed for
  ``.gz``), for progress bars.
  """
  stream, raw = open_binary(path)
  with stream, raw:
    carry = b""
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
    self._confidences = _ConfidenceTexts()

  def __iter__(self) -> AnnotationReader:
    return self

  def __next__(self) -> Row:
    if self._rows is None:
      self._rows = (b.row(r) for b in self.batches() for r in range(len(b)))
    return next(self._rows)

  def batches(self) -> Iterator[LabelBatch]:
    first_lineno = 1
    for chunk, self.bytes_read in _whole_lines(self.path, self.chunk_bytes):
      first_lineno += yield from self._parse(chunk, first_lineno)

  def _parse(self, chunk: bytes, first_lineno: int
             ) -> Generator[LabelBatch, None, int]:
    """Yields the chunk's batch (if any line has a key); returns its lines."""
    batch, num_lines = _parse_chunk(
        chunk, first_lineno, self.num_classes, self.source,
        self._on_invalid if self.skip_invalid else None, self._confidences)
    self.num_rows += len(batch)
    if len(batch):
      yield batch
    return num_lines

  def _on_invalid(self, error: LabelError) -> None:
    self.num_invalid += 1
    if len(self.invalid_examples) < _MAX_EXAMPLES:
      self.invalid_examples.append(str(error))


def read_annotation_file(path: PathLike, *, num_classes: int | None = None,
                         skip_invalid: bool = False) -> AnnotationReader:
  """An iterator of (key, indices, confidences); see `AnnotationReader`."""
  return AnnotationReader(path, num_classes=num_classes,
                          skip_invalid=skip_invalid)


def _parse_chunk(chunk: bytes, first_lineno: int | np.ndarray,
                 num_classes: int | None, source: str,
                 on_invalid: Callable[[LabelError], None] | None,
                 confidences: _ConfidenceTexts) -> tuple[LabelBatch, int]:
  """Tokenises whole lines (`chunk` ends with a newline) with NumPy.

  `first_lineno` numbers the chunk's lines consecutively from it, or, as an
  array, gives each line's number (lines gathered from across a file).
  Returns the batch and the number of lines the chunk held.
  """
  padded = np.frombuffer(chunk + bytes(_WINDOW), np.uint8)
  buf = padded[:len(chunk)]
  sep = ((buf - np.uint8(9)) <= 4) | (buf == 32)  # What `_WHITESPACE` splits.
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
                  num_classes: int | None, confidences: _ConfidenceTexts
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


class _ConfidenceTexts:
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


# ---- whole files ------------------------------------------------------------


@dataclasses.dataclass
class AugmentSummary:
  """What `augment_file` did, for the CLI's closing line."""

  lines: int = 0
  rows: int = 0  # Lines with a key (not blank), invalid ones excepted.
  invalid: int = 0
  memo_hits: int = 0  # Rows whose annotation text was augmented before.
  kernel_rows: int = 0  # Rows the compiled kernel augmented (the others:
  # the NumPy path, memo hits included).
  workers: int = 1  # Threads or processes that augmented (1: this one).
  invalid_examples: list[str] = dataclasses.field(default_factory=list)

  def add(self, other: AugmentSummary) -> None:
    self.lines += other.lines
    self.rows += other.rows
    self.invalid += other.invalid
    self.memo_hits += other.memo_hits
    self.kernel_rows += other.kernel_rows
    room = _MAX_EXAMPLES - len(self.invalid_examples)
    self.invalid_examples += other.invalid_examples[:room]


class ChunkAugmenter:
  """Augments chunks of whole lines: compiled kernel, NumPy path for the rest.

  With `compiled` (needs numba), `labels_kernel` augments every line it can
  parse exactly and defers the others (invalid, unusual, new confidence
  texts beyond its table) to the NumPy path, whose output is spliced in at
  their places: the same bytes, errors and skip counts as without it.

  The NumPy path: real lists repeat annotation texts massively (each
  ImageNet row carries one of ~10k leaf classes, and popular tag sets
  recur), so every line is split into key and annotation text with one C
  call and looked up in a dict of already augmented texts; only the misses
  go through the vectorised path (`_parse_chunk`, `augment_batch`,
  `LabelFormatter`), keys stripped. The dict is cleared when it exceeds
  `max_memo` texts, so memory stays bounded. Invalid texts are never
  memoised: each occurrence is reported (or skipped and counted) with its
  own line number.
  """

  def __init__(self, hierarchy: Hierarchy, *,
               pairs: CooccurrencePairs | None = None, source: str,
               skip_invalid: bool = False, max_memo: int = 1 << 16,
               compiled: bool = False, out_bytes: int = 1 << 20):
    self.hierarchy = hierarchy
    self.pairs = pairs
    self.source = source
    self.skip_invalid = skip_invalid
    self.max_memo = max_memo
    self._memo: dict[bytes, bytes] = {}
    self._formatter = LabelFormatter(hierarchy.num_classes)
    self._confidences = _ConfidenceTexts()
    self._kernel = None
    if compiled:
      from mlimages_jax.data import labels_kernel  # Imports numba: slow.
      self._kernel = labels_kernel.Kernel(hierarchy, pairs,
                                          out_bytes=out_bytes)

  def __call__(self, chunk: bytes, first_lineno: int
               ) -> tuple[bytes | np.ndarray, AugmentSummary]:
    """The augmented lines of a chunk (it ends with a newline).

    The text is bytes, or a uint8 array that stays valid until the next call
    (the kernel's buffer: not copied).
    """
    if self._kernel is not None:
      return self._compiled(chunk, first_lineno)
    lines = chunk.split(b"\n")
    lines.pop()  # After the final newline.
    keys, closed, summary = self._augment_lines(
        lines, first_lineno + np.arange(len(lines)))
    if summary.invalid:  # Their closed text stayed None: drop those lines.
      keys = list(itertools.compress(keys, closed))  # Texts are never b"".
      closed = [c for c in closed if c is not None]
    pieces = [b""] * (2 * len(keys))
    pieces[0::2] = keys
    pieces[1::2] = closed
    return b"".join(pieces), summary

  def _compiled(self, chunk: bytes, first_lineno: int
                ) -> tuple[bytes | np.ndarray, AugmentSummary]:
    """The kernel's output with the deferred lines' spliced in."""
    summary = AugmentSummary()
    pieces = []
    pos, lineno = 0, first_lineno
    while pos < len(chunk):
      step = self._kernel.step(chunk, pos, lineno)
      pos, lineno = step.pos, step.lineno
      summary.kernel_rows += step.rows
      # The kernel's buffer is reused by its next step: copy unless last.
      out = step.out if pos == len(chunk) else step.out.tobytes()
      if not len(step.deferred):
        pieces.append(out)
        continue
      starts, ends, linenos, at = step.deferred.T.tolist()
      keys, closed, part = self._augment_lines(
          [chunk[a:b] for a, b in zip(starts, ends)], np.array(linenos))
      summary.add(part)
      done = 0
      for a, key, text in zip(at, keys, closed):
        pieces.append(out[done:a])
        if text is not None:
          pieces += [key, text]
        done = a
      pieces.append(out[done:])
    summary.lines = lineno - first_lineno
    summary.rows += summary.kernel_rows
    return pieces[0] if len(pieces) == 1 else b"".join(pieces), summary

  def _augment_lines(self, lines: list[bytes], linenos: np.ndarray
                     ) -> tuple[list[bytes], list[bytes | None],
                                AugmentSummary]:
    """(keys, closed texts, summary) of the non-blank lines (NumPy path).

    `linenos` numbers `lines`; the closed text of an invalid line is None
    (skipped and counted, or LabelError without `skip_invalid`).
    """
    summary = AugmentSummary(lines=len(lines))
    keys, texts, line_index = _split_keys(lines)
    if len(self._memo) > self.max_memo:
      self._memo.clear()
    closed = list(map(self._memo.get, texts))
    misses = list(itertools.compress(itertools.count(), map(
        operator.is_, closed, itertools.repeat(None))))
    if misses:
      rows = np.array(misses) if line_index is None else line_index[misses]
      self._augment_misses(texts, closed, misses, linenos[rows], summary)
    summary.rows = len(keys) - summary.invalid
    summary.memo_hits = len(texts) - len(misses)
    return keys, closed, summary

  def _augment_misses(self, texts: list[bytes], closed: list[bytes | None],
                      misses: list[int], linenos: np.ndarray,
                      summary: AugmentSummary) -> None:
    """Fills `closed` (and the memo) for the lines `misses` with NumPy."""
    def invalid(error: LabelError) -> None:
      summary.invalid += 1
      if len(summary.invalid_examples) < _MAX_EXAMPLES:
        summary.invalid_examples.append(str(error))

    # A one-byte stand-in key: only the annotation text is parsed.
    chunk = b"k " + b"\nk ".join([texts[i] for i in misses]) + b"\n"
    batch, _ = _parse_chunk(chunk, linenos, self.hierarchy.num_classes,
                            self.source, invalid if self.skip_invalid else None,
                            self._confidences)
    closed_texts = self._formatter.format(*augment_batch(
        self.hierarchy, batch.indptr, batch.indices, batch.confidences,
        pairs=self.pairs)).splitlines(keepends=True)
    valid = (misses if len(batch) == len(misses) else
             np.asarray(misses)[np.searchsorted(linenos, batch.linenos)]
             .tolist())
    memo = self._memo
    for i, text in zip(valid, closed_texts):
      closed[i] = memo[texts[i]] = text


def _split_keys(lines: list[bytes]
                ) -> tuple[list[bytes], list[bytes], np.ndarray | None]:
  """(keys, annotation texts, line of each) of the lines that have a key.

  The usual TAB-separated lines split with one `bytes.partition` each (line
  index: None, i.e. all lines); others (spaces, blank or key-only lines)
  with `bytes.split`, which knows the same whitespace as the tokeniser.
  """
  parts = list(map(bytes.partition, lines, itertools.repeat(b"\t")))
  keys = list(map(_FIRST, parts))
  joined = b"".join(keys)
  if all(map(_SECOND, parts)) and all(keys) and not any(
      c in joined for c in _OTHER_SPACE):
    return keys, list(map(_THIRD, parts)), None
  keys, texts, line_index = [], [], []
  for n, line in enumerate(lines):
    fields = line.split(None, 1)
    if fields:
      keys.append(fields[0])
      texts.append(fields[1] if len(fields) == 2 else b"")
      line_index.append(n)
  return keys, texts, np.array(line_index, np.int64)


def augment_file(hierarchy: Hierarchy, input_path: PathLike,
                 output_path: PathLike, *,
                 pairs: CooccurrencePairs | None = None,
                 skip_invalid: bool = False, chunk_bytes: int = 1 << 18,
                 workers: int = 1, max_memo: int = 1 << 16,
                 compiled: bool | None = None,
                 progress: Callable[[int], None] | None = None
                 ) -> AugmentSummary:
  """Writes the augmented annotations of every line, same keys, same order.

  Lines go through `ChunkAugmenter`: its compiled kernel when `compiled`
  (default: when numba is installed), and the NumPy path (memo of at most
  `max_memo` annotation texts) for what the kernel defers. With `workers` >
  1, chunks are augmented by that many threads (compiled) or processes (at
  most one per `_MIN_CHUNKS_PER_WORKER` chunks of the file: starting a
  process costs about as much as augmenting those), each with its own
  augmenter, and written in input order; at most two chunks per worker are
  in flight, so memory stays bounded. The output appears only when the whole
  input was processed (atomic), so a killed run leaves nothing half-written
  and is simply run again. A `.gz` output path is compressed.
  """
  if compiled is None:
    compiled = importlib.util.find_spec("numba") is not None
  options = dict(pairs=pairs, source=str(input_path),
                 skip_invalid=skip_invalid, max_memo=max_memo,
                 compiled=compiled, out_bytes=4 * chunk_bytes)
  workers = min(workers, os.path.getsize(input_path) // (
      _MIN_CHUNKS_PER_WORKER * chunk_bytes))
  chunks = _whole_lines(input_path, chunk_bytes)
  summary = AugmentSummary(workers=max(workers, 1))
  with atomic_writer(output_path, "wb") as raw, _compressed(
      raw, output_path) as out:
    results = (_augment_in_workers(hierarchy, options, chunks, workers)
               if workers > 1 else
               _augment_here(ChunkAugmenter(hierarchy, **options), chunks))
    for text, part, position in results:
      out.write(text)
      summary.add(part)
      if progress is not None:
        progress(position)
  return summary


def _augment_here(augmenter: ChunkAugmenter,
                  chunks: Iterator[tuple[bytes, int]]
                  ) -> Iterator[tuple[bytes, AugmentSummary, int]]:
  """(text, summary, bytes read) of each chunk, in this process."""
  lineno = 1
  for chunk, position in chunks:
    text, summary = augmenter(chunk, lineno)
    lineno += summary.lines
    yield text, summary, position


def _augment_in_workers(hierarchy: Hierarchy, options: dict,
                        chunks: Iterator[tuple[bytes, int]], workers: int
                        ) -> Iterator[tuple[bytes, AugmentSummary, int]]:
  """`_augment_here` on a pool of workers, results in input order.

  Compiled, the workers are threads: the kernel releases the GIL, and
  processes would cost more in pickling its output than they save (the
  main process then did ~0.95x the work of augmenting alone). The NumPy
  path holds the GIL: processes. A process that dies (killed, out of
  memory) fails the run with `BrokenProcessPool` instead of hanging it.
  """
  executor = (concurrent.futures.ThreadPoolExecutor if options["compiled"]
              else functools.partial(
                  concurrent.futures.ProcessPoolExecutor,
                  mp_context=multiprocessing.get_context("spawn")))
  with executor(workers, initializer=_start_worker,
                initargs=(hierarchy, options)) as pool:
    pending = collections.deque()
    lineno = 1
    for chunk, position in chunks:
      pending.append((pool.submit(_work, chunk, lineno), position))
      lineno += chunk.count(b"\n")
      if len(pending) >= 2 * workers:
        result, done_at = pending.popleft()
        yield (*result.result(), done_at)
    for result, done_at in pending:
      yield (*result.result(), done_at)


_worker = threading.local()  # The augmenter of a worker thread or process.


def _start_worker(hierarchy: Hierarchy, options: dict) -> None:
  _worker.augmenter = ChunkAugmenter(hierarchy, **options)


def _work(chunk: bytes, first_lineno: int) -> tuple[bytes, AugmentSummary]:
  text, summary = _worker.augmenter(chunk, first_lineno)
  return bytes(text), summary  # A copy: the kernel reuses its buffer.


def load_cooccurrence_pairs(path: PathLike, num_classes: int
                            ) -> CooccurrencePairs:
  """`cooccurrence.load_cooccurrence_pairs`, reachable where `augment` is."""
  from mlimages_jax.data import cooccurrence  # Circular at import time.
  return cooccurrence.load_cooccurrence_pairs(path, num_classes)


# ---- Open Images tags -------------------------------------------------------


def load_openimages_mapping(path: PathLike, num_classes: int
                            ) -> dict[str, int]:
  """Reads ``<Open Images label id> <ML-Images index>`` lines (TAB or spaces).

  Several Open Images ids may map to one class (merged synonyms); one id
  mapping to two classes is an error. ``#`` lines are comments, and a first
  line whose second column is not a number is a header.
  """
  source = str(path)
  mapping: dict[str, int] = {}
  first_line: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      fields = line.split()
      if not fields or fields[0].startswith("#"):
        continue
      if len(fields) < 2:
        raise LabelError(source, lineno, "expected an Open Images label id "
                         f"and an ML-Images index, got {line.strip()!r}")
      try:
        index = int(fields[1])
      except ValueError:
        if not mapping and lineno == 1:
          continue  # Header.
        raise LabelError(source, lineno, f"ML-Images index {fields[1]!r} is "
                         "not an integer") from None
      if not 0 <= index < num_classes:
        raise LabelError(source, lineno, f"ML-Images index {index} out of "
                         f"range 0..{num_classes - 1}")
      label = fields[0]
      if label in mapping and mapping[label] != index:
        raise LabelError(source, lineno, f"{label} maps to {index} here but to "
                         f"{mapping[label]} on line {first_line[label]}")
      mapping[label] = index
      first_line.setdefault(label, lineno)
  return mapping


@dataclasses.dataclass
class RemapSummary:
  """What `remap_openimages_file` kept and dropped."""

  rows_in: int = 0
  rows_out: int = 0
  rows_empty: int = 0  # Rows left without any mapped tag.
  tags_in: int = 0
  tags_kept: int = 0
  tags_dropped: int = 0
  invalid: int = 0
  unmapped: dict[str, int] = dataclasses.field(default_factory=dict)
  invalid_examples: list[str] = dataclasses.field(default_factory=list)


def remap_openimages_file(input_path: PathLike, output_path: PathLike,
                          mapping: dict[str, int], *,
                          keep_empty: bool = False,
                          skip_invalid: bool = False,
                          progress: Callable[[int], None] | None = None
                          ) -> RemapSummary:
  """Open Images tags -> ML-Images annotation lines (step 1 of §3).

  Input: either lines ``key label_id[:confidence] ...`` (TABs or spaces), or
  the Open Images image-level CSV (``ImageID,Source,LabelName,Confidence``,
  rows grouped by image), recognised by its header. Tags outside `mapping`
  are dropped and counted per label id; rows left without tags are dropped
  unless `keep_empty`. Output is written atomically.
  """
  summary = RemapSummary()
  source = str(input_path)

  def invalid(error: LabelError) -> None:
    if not skip_invalid:
      raise error
    summary.invalid += 1
    if len(summary.invalid_examples) < _MAX_EXAMPLES:
      summary.invalid_examples.append(str(error))

  with atomic_writer(output_path, "wb") as raw, _compressed(
      raw, output_path) as out:
    stream, file = open_binary(input_path)
    with stream, file:
      text = io.TextIOWrapper(stream, encoding="utf-8", newline=None)
      for lineno, (key, tags) in enumerate(_openimages_rows(text, source,
                                                            invalid)):
        summary.rows_in += 1
        idx, conf = [], []
        for label, c in tags:
          summary.tags_in += 1
          index = mapping.get(label)
          if index is None:
            summary.tags_dropped += 1
            summary.unmapped[label] = summary.unmapped.get(label, 0) + 1
            continue
          idx.append(index)
          conf.append(c)
        summary.tags_kept += len(idx)
        if not idx:
          summary.rows_empty += 1
          if not keep_empty:
            continue
        _, idx_a, conf_a = reduce_max(
            np.zeros(len(idx), np.int64), np.array(idx, np.int32),
            np.array(conf, np.float32), 1, max(idx, default=0) + 1)
        out.write((format_line(key, idx_a, conf_a) + "\n").encode())
        summary.rows_out += 1
        if progress is not None and lineno % 4096 == 0:
          progress(file.tell())
  return summary


def _openimages_rows(text: Iterator[str], source: str,
                     invalid: Callable[[LabelError], None]
                     ) -> Iterator[tuple[str, list[tuple[str, float]]]]:
  """(key, [(label id, confidence)]) from either input format."""
  lines = enumerate(text, start=1)
  first = next(lines, None)
  if first is None:
    return
  header = [c.strip() for c in first[1].split(",")]
  if header[:1] == ["ImageID"] and "LabelName" in header:
    yield from _openimages_csv_rows(lines, header, source, invalid)
    return
  for lineno, line in itertools.chain([first], lines):
    tokens = _WHITESPACE.split(line.strip(" \t\r\n\v\f"))
    if not tokens[0]:
      continue
    tags = []
    try:
      for token in tokens[1:]:
        label, colon, conf_s = token.rpartition(":")
        if not colon:
          label, conf_s = conf_s, "1"
        conf = _confidence(conf_s, token, source, lineno)
        tags.append((label, conf))
    except LabelError as e:
      invalid(e)
      continue
    yield tokens[0], tags


def _confidence(text: str, token: str, source: str, lineno: int) -> float:
  try:
    conf = float(text)
  except ValueError:
    raise LabelError(source, lineno, f"bad tag {token!r}: expected "
                     "label_id or label_id:confidence") from None
  if not -1.0 <= conf <= 1.0:
    raise LabelError(source, lineno, f"confidence {text!r} outside [-1, 1]")
  return conf


def _openimages_csv_rows(lines, header: list[str], source: str,
                         invalid: Callable[[LabelError], None]
                         ) -> Iterator[tuple[str, list[tuple[str, float]]]]:
  image_col, label_col = header.index("ImageID"), header.index("LabelName")
  conf_col = header.index("Confidence") if "Confidence" in header else None
  key, tags = None, []
  for lineno, line in lines:
    fields = [c.strip() for c in line.rstrip("\r\n").split(",")]
    if fields == [""]:
      continue
    try:
      if len(fields) != len(header):
        raise LabelError(source, lineno, f"expected {len(header)} CSV "
                         f"columns, got {len(fields)}")
      conf = (1.0 if conf_col is None else
              _confidence(fields[conf_col], line.strip(), source, lineno))
    except LabelError as e:
      invalid(e)
      continue
    if fields[image_col] != key:
      if key is not None:
        yield key, tags
      key, tags = fields[image_col], []
    tags.append((fields[label_col], conf))
  if key is not None:
    yield key, tags
