"""Whole annotation files augmented in bounded memory: `augment_file`.

Files stream through `ChunkAugmenter`: a compiled kernel (`augment_kernel`,
numba, imported only then) augments chunks of bytes line by line, and hands
the lines it cannot parse exactly (invalid or unusual ones) to the batch
path, which formats them or raises the error; that path keeps a bounded memo
from annotation text to augmented text. `workers` threads share the chunks
of one file. Measured figures (the kernel: ~2-3x the CPU time of merely
splitting the lines; the batch path alone: ~8-12x):
benchmarks/labels_bench.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import importlib.util
import itertools
import multiprocessing
import operator
import os
import threading
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from mlimages_jax.fileio import PathLike, atomic_writer
from mlimages_jax.data.annotation_reader import ConfidenceTexts
from mlimages_jax.data.annotation_reader import compressed_writer
from mlimages_jax.data.annotation_reader import parse_chunk
from mlimages_jax.data.annotation_reader import utf8_lines
from mlimages_jax.data.annotation_reader import whole_lines
from mlimages_jax.data.annotations import LabelError
from mlimages_jax.data.annotations import MAX_EXAMPLES
from mlimages_jax.data.closure import augment_batch
from mlimages_jax.data.hierarchy import Hierarchy
from mlimages_jax.data.label_batch import LabelFormatter

if TYPE_CHECKING:
  from mlimages_jax.data.cooccurrence import CooccurrencePairs

_FIRST, _SECOND, _THIRD = (operator.itemgetter(k) for k in range(3))
_OTHER_SPACE = (b" ", b"\r", b"\v", b"\f")  # Whitespace, apart from TAB.
_MIN_CHUNKS_PER_WORKER = 64


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
    room = MAX_EXAMPLES - len(self.invalid_examples)
    self.invalid_examples += other.invalid_examples[:room]

  def count_invalid(self, error: LabelError) -> None:
    """Counts a skipped line, keeping the first messages."""
    self.invalid += 1
    if len(self.invalid_examples) < MAX_EXAMPLES:
      self.invalid_examples.append(str(error))


class ChunkAugmenter:
  """Augments chunks of whole lines: compiled kernel, NumPy path for the rest.

  With `compiled` (needs numba), `augment_kernel` augments every line it can
  parse exactly and defers the others (invalid, unusual, new confidence
  texts beyond its table) to the NumPy path, whose output is spliced in at
  their places: the same bytes, errors and skip counts as without it.

  The NumPy path: real lists repeat annotation texts massively (each
  ImageNet row carries one of ~10k leaf classes, and popular tag sets
  recur), so every line is split into key and annotation text with one C
  call and looked up in a dict of already augmented texts; only the misses
  go through the vectorised path (`parse_chunk`, `augment_batch`,
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
    self._confidences = ConfidenceTexts()
    self._kernel = None
    if compiled:
      from mlimages_jax.data import augment_kernel  # Imports numba: slow.
      self._kernel = augment_kernel.Kernel(hierarchy, pairs,
                                           out_bytes=out_bytes)

  def __call__(self, chunk: bytes, first_lineno: int
               ) -> tuple[bytes | np.ndarray, AugmentSummary]:
    """The augmented lines of a chunk (it ends with a newline).

    The text is bytes, or a uint8 array that stays valid until the next call
    (the kernel's buffer: not copied).
    """
    errors: list[LabelError] = []
    chunk = utf8_lines(chunk, first_lineno, self.source,
                       errors.append if self.skip_invalid else None)
    text, summary = self._augment(chunk, first_lineno)
    for error in errors:
      summary.count_invalid(error)
    return text, summary

  def _augment(self, chunk: bytes, first_lineno: int
               ) -> tuple[bytes | np.ndarray, AugmentSummary]:
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
    # A one-byte stand-in key: only the annotation text is parsed.
    chunk = b"k " + b"\nk ".join([texts[i] for i in misses]) + b"\n"
    batch, _ = parse_chunk(chunk, linenos, self.hierarchy.num_classes,
                           self.source,
                           summary.count_invalid if self.skip_invalid else None,
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
  chunks = whole_lines(input_path, chunk_bytes)
  summary = AugmentSummary(workers=max(workers, 1))
  with atomic_writer(output_path, "wb") as raw, compressed_writer(
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
