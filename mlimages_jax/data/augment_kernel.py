"""Compiled (numba) hot path of `augment.augment_file`: bytes in, bytes out.

One call walks whole lines of a chunk and, for each, parses the key and the
``index[:confidence]`` tokens, merges repeated indices, adds co-occurrence
targets, closes over the hierarchy's ancestor CSR, sorts and writes the
closed line, all without a Python object per line. That is what brings the
augment of a file to a small multiple of merely splitting its lines.

It only handles lines it can parse exactly as `annotations.parse_line` does
(ASCII digits; confidences ``[-]digits[.digits]`` of at most 15 digits, whose
float64 value ``m / 10**k`` is then correctly rounded, as ``float()`` is)
and values whose text it knows. Any other line (invalid, unusual, or with a
value whose text it cannot write) is deferred: its position is returned and
`augment.ChunkAugmenter` runs the NumPy path on it, which either formats it
or raises the error naming file and line. So both paths give the same bytes.

Confidence texts come from `annotations.format_confidence` through a small
hash table keyed by float32 bits: a value seen for the first time stops the
call so that Python can add its text (a handful of stops per file); once the
table is full, lines with new values are deferred instead. -0.0 is never
given a text: a -0/+0 tie is settled by the NumPy path's sort order.

This module imports numba, so `augment` imports it lazily (the label tools
start fast). Compiled code is cached on disk (``cache=True``: next to this
file, or in numba's per-user cache directory when the package is read-only).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numba
import numpy as np

from mlimages_jax.data.annotations import format_confidence
from mlimages_jax.data.hierarchy import Hierarchy

if TYPE_CHECKING:
  from mlimages_jax.data.cooccurrence import CooccurrencePairs

_TEXT_WIDTH = 32  # Longest confidence text kept; longer ones: NumPy path.
_PREFIX_WIDTH = 16  # "\t<index>:" of every class.
_TABLE_SLOTS = 1 << 14
_MAX_TEXTS = _TABLE_SLOTS // 2  # Then lines with new values are deferred.
_EMPTY = -1  # Slot key of an empty slot; length of a value without text.
_MAX_DEFERRED = 1 << 12  # Deferred lines per call.
_POW10 = 10.0 ** np.arange(16)  # Exact float64 powers.

# `_step` returns for one of these reasons.
DONE, OUT_FULL, NEW_VALUE, DEFERRED_FULL = range(4)


def _jit(func=None, **options):
  """numba.njit, cached on disk when a cache directory is writable."""
  if func is None:
    return lambda f: _jit(f, **options)
  try:
    return numba.njit(cache=True, nogil=True, **options)(func)
  except RuntimeError:  # No writable cache directory at all: JIT each run.
    return numba.njit(nogil=True, **options)(func)


# Helpers are inlined into `_step` in numba's IR: a call would pass (and
# reference-count) every array argument, which costs more than their work.
# (`Kernel.add_text` calls `_slot` from Python too: compiled apart then.)
_inline = _jit(inline="always")


@_inline
def _is_space(byte) -> bool:
  # What `annotations.WHITESPACE` splits.
  return byte == 32 or 9 <= byte <= 13


@_inline
def _slot(keys, bits) -> int:
  """The slot of `bits` in the open-addressing table, or of an empty slot."""
  mask = len(keys) - 1
  slot = ((bits * 2654435761) >> 16) & mask  # Wraps around: fine.
  while keys[slot] != _EMPTY and keys[slot] != bits:
    slot = (slot + 1) & mask
  return slot


@_inline
def _merge(best, touched, count, index, conf) -> int:
  """best[index] = max(best[index], conf); returns the new touched count.

  Branch-free: whether a class was touched before is unpredictable, and a
  mispredicted branch per ancestor made the closure 5x slower.
  """
  previous = best[index]
  touched[count] = index  # Kept only if new (`touched` has a spare slot).
  best[index] = conf if conf > previous else previous
  return count + (previous == -np.inf)


@_inline
def _sort(values, count, ranked) -> None:
  """Sorts values[:count] (distinct) ascending.

  Up to 64 values: each goes to its rank, counted without branches (the
  comparisons vectorise); an insertion sort's mispredicted branches cost
  more. Beyond (rare): a Shell sort, which compiles far faster than np.sort.
  """
  if count > len(ranked):
    gap = count // 2
    while gap > 0:
      for i in range(gap, count):
        v = values[i]
        j = i
        while j >= gap and values[j - gap] > v:
          values[j] = values[j - gap]
          j -= gap
        values[j] = v
      gap //= 2
    return
  for i in range(count):
    v = values[i]
    rank = 0
    for j in range(count):
      rank += values[j] < v
    ranked[rank] = v
  for i in range(count):
    values[i] = ranked[i]


@_inline
def _parse_labels(buf, p, num_classes, pow10, best, touched):
  """Merges the tokens from p to the newline: (count, position, ok)."""
  count = 0
  while True:
    while buf[p] != 10 and _is_space(buf[p]):
      p += 1
    if buf[p] == 10:
      return count, p, True
    index = 0
    digits = 0
    while 48 <= buf[p] <= 57:
      index = index * 10 + (buf[p] - 48)
      digits += 1
      p += 1
    if digits == 0 or digits > 9 or index >= num_classes:
      return count, p, False
    conf = np.float32(1.0)
    if buf[p] == 58:  # ':'
      p += 1
      negative = buf[p] == 45  # '-'
      if negative:
        p += 1
      mantissa = 0
      digits = 0
      decimals = 0
      dot = False
      while True:
        if 48 <= buf[p] <= 57:
          mantissa = mantissa * 10 + (buf[p] - 48)
          digits += 1
          if dot:
            decimals += 1
        elif buf[p] == 46 and not dot:  # '.'
          dot = True
        else:
          break
        p += 1
      if digits == 0 or digits > 15:
        return count, p, False
      value = mantissa / pow10[decimals]  # Both exact: correctly rounded.
      if negative:
        value = -value
      if not -1.0 <= value <= 1.0:
        return count, p, False
      conf = np.float32(value)
    if not _is_space(buf[p]):
      return count, p, False
    count = _merge(best, touched, count, index, conf)


@_jit
def _step(buf, pos, lineno, out, out_pos, deferred, num_deferred, can_add,
          anc_ptr, anc_idx, chain_ptr, chain_idx, pair_ptr, pair_tgt,
          pair_conf, prefix,
          prefix_len, keys, lengths, texts, pow10, best, touched, own,
          ranked):
  """Augments the lines of buf[pos:] (buf ends with a newline) into `out`.

  Appends from `out_pos` and to the `num_deferred` deferred lines, rows of
  `deferred`: (start, end without the newline, line number, where its
  output goes). Returns (reason, pos, lineno, out_pos, num_deferred, rows,
  detail): detail is the float32 bits of a new value (NEW_VALUE, only when
  `can_add`) or the bytes the next line needs (OUT_FULL).
  """
  num_classes = len(prefix)
  rows = 0
  bits_of = np.zeros(1, np.float32)
  bits_view = bits_of.view(np.uint32)
  while pos < len(buf):
    p = pos
    while buf[p] != 10 and _is_space(buf[p]):
      p += 1
    if buf[p] == 10:  # Blank line.
      pos = p + 1
      lineno += 1
      continue
    key_start = p
    while not _is_space(buf[p]):
      p += 1
    key_end = p
    count, p, ok = _parse_labels(buf, p, num_classes, pow10, best, touched)
    if ok:
      annotated = count
      for k in range(annotated):
        own[k] = best[touched[k]]
      c = touched[0]
      if (annotated == 1 and own[0] > 0
          and pair_ptr[c] == pair_ptr[c + 1]):  # Most rows: a sorted chain.
        count = 0
        for q in range(chain_ptr[c], chain_ptr[c + 1]):
          touched[count] = chain_idx[q]
          best[chain_idx[q]] = own[0]
          count += 1
      else:
        for k in range(annotated):  # Co-occurrence, from the own labels.
          if own[k] > 0:
            c = touched[k]
            for q in range(pair_ptr[c], pair_ptr[c + 1]):
              count = _merge(best, touched, count, pair_tgt[q],
                             min(own[k], pair_conf[q]))
        expanded = count
        for k in range(expanded):  # Closure: a descendant's value is >= its
          c = touched[k]  # own, so propagating updated values is the same.
          conf = best[c]
          if conf > 0:
            for q in range(anc_ptr[c], anc_ptr[c + 1]):
              count = _merge(best, touched, count, anc_idx[q], conf)
        _sort(touched, count, ranked)
      need = key_end - key_start + 1 + count * (_PREFIX_WIDTH + _TEXT_WIDTH)
      if out_pos + need > len(out):
        for k in range(count):
          best[touched[k]] = -np.inf
        return OUT_FULL, pos, lineno, out_pos, num_deferred, rows, need
      start = out_pos
      for q in range(key_start, key_end):
        out[out_pos] = buf[q]
        out_pos += 1
      last_bits = np.uint32(0)
      slot = -1
      for k in range(count):
        c = touched[k]
        bits_of[0] = best[c]
        bits = bits_view[0]
        if slot < 0 or bits != last_bits:
          slot = _slot(keys, np.int64(bits))
          last_bits = bits
        n = lengths[slot]
        if keys[slot] == _EMPTY or n == _EMPTY:
          ok = False
          break
        # Fixed-length copies (vector moves; `need` leaves room for the
        # bytes past the end), then the position moves by the real length.
        for q in range(_PREFIX_WIDTH):
          out[out_pos + q] = prefix[c, q]
        out_pos += prefix_len[c]
        if n <= 8:
          for q in range(8):
            out[out_pos + q] = texts[slot, q]
        else:
          for q in range(n):
            out[out_pos + q] = texts[slot, q]
        out_pos += n
      for k in range(count):
        best[touched[k]] = -np.inf
      if ok:
        out[out_pos] = 10
        out_pos += 1
        rows += 1
      else:
        out_pos = start
        if keys[slot] == _EMPTY and can_add:
          return (NEW_VALUE, pos, lineno, out_pos, num_deferred, rows,
                  np.int64(bits))
    else:
      for k in range(count):
        best[touched[k]] = -np.inf
    while buf[p] != 10:
      p += 1
    if not ok:
      if num_deferred == len(deferred):
        return DEFERRED_FULL, pos, lineno, out_pos, num_deferred, rows, 0
      deferred[num_deferred, 0] = pos
      deferred[num_deferred, 1] = p
      deferred[num_deferred, 2] = lineno
      deferred[num_deferred, 3] = out_pos
      num_deferred += 1
    pos = p + 1
    lineno += 1
  return DONE, pos, lineno, out_pos, num_deferred, rows, 0


@dataclasses.dataclass
class Step:
  """What one `Kernel.step` call did (see `_step`)."""

  pos: int  # Where the next call starts (the chunk's end: done).
  lineno: int
  out: np.ndarray  # The augmented lines written, a view of the buffer.
  deferred: np.ndarray  # int64 [D, 4]: start, end, line number, out pos.
  rows: int  # Lines augmented (written to `out`).


class Kernel:
  """The compiled path for one hierarchy (and pairs), with its state.

  State: the hierarchy's arrays, the table of confidence texts, scratch
  space and the output buffer; one Kernel per thread.
  """

  def __init__(self, hierarchy: Hierarchy,
               pairs: CooccurrencePairs | None = None, *,
               out_bytes: int = 1 << 20):
    n = hierarchy.num_classes
    # Fresh writable copies: numba compiles once per array type, and
    # read-only arrays are another type.
    self.anc_ptr = np.array(hierarchy.ancestor_indptr, np.int64)
    self.anc_idx = np.array(hierarchy.ancestor_indices, np.int32)
    self.chain_ptr = np.array(hierarchy.closure_csr[0], np.int64)
    self.chain_idx = np.array(hierarchy.closure_csr[1], np.int32)
    if pairs is None:
      self.pair_ptr = np.zeros(n + 1, np.int64)
      self.pair_tgt = np.zeros(0, np.int32)
      self.pair_conf = np.zeros(0, np.float32)
    else:
      self.pair_ptr = np.array(pairs.indptr, np.int64)
      self.pair_tgt = np.array(pairs.targets, np.int32)
      self.pair_conf = np.array(pairs.confidences, np.float32)
    prefixes = np.array([f"\t{i}:".encode() for i in range(n)],
                        f"S{_PREFIX_WIDTH}")  # Zero-padded.
    self.prefix = prefixes.view(np.uint8).reshape(n, _PREFIX_WIDTH)
    self.prefix_len = np.char.str_len(prefixes).astype(np.int64)
    self.keys = np.full(_TABLE_SLOTS, _EMPTY, np.int64)
    self.lengths = np.zeros(_TABLE_SLOTS, np.int64)
    self.texts = np.zeros((_TABLE_SLOTS, _TEXT_WIDTH), np.uint8)
    self.num_texts = 0
    self.best = np.full(n, -np.inf, np.float32)
    self.touched = np.zeros(n + 1, np.int32)
    self.ranked = np.zeros(64, np.int32)
    self.own = np.zeros(n, np.float32)
    self.out = np.empty(out_bytes, np.uint8)
    self.deferred = np.zeros((_MAX_DEFERRED, 4), np.int64)

  def step(self, chunk: bytes, pos: int, lineno: int) -> Step:
    """Augments chunk[pos:] (whole lines) from line number `lineno` on.

    Runs `_step`, adding texts of new values and growing a too small output
    buffer itself; returns when the chunk is done or when output or deferred
    lines must be taken (`out` and `deferred` are reused by the next call).
    """
    buf = np.frombuffer(chunk, np.uint8)  # Always read-only: one type.
    used = num_deferred = rows = 0
    while True:
      reason, pos, lineno, used, num_deferred, done, detail = _step(
          buf, pos, lineno, self.out, used, self.deferred, num_deferred,
          self.num_texts < _MAX_TEXTS, self.anc_ptr, self.anc_idx,
          self.chain_ptr, self.chain_idx, self.pair_ptr, self.pair_tgt,
          self.pair_conf, self.prefix, self.prefix_len, self.keys,
          self.lengths, self.texts, _POW10, self.best, self.touched,
          self.own, self.ranked)
      rows += done
      if reason == NEW_VALUE:
        self.add_text(detail)
      elif reason == OUT_FULL and not (used or num_deferred):
        self.out = np.empty(max(2 * len(self.out), detail), np.uint8)
      else:
        return Step(pos, lineno, self.out[:used],
                    self.deferred[:num_deferred], rows)

  def add_text(self, bits: int) -> None:
    """Adds the text of a float32 value; -0.0 and long texts get none."""
    value = np.array([bits], np.uint32).view(np.float32)[0]
    text = format_confidence(float(value)).encode()
    slot = _slot(self.keys, bits)
    self.keys[slot] = bits
    if bits == 0x80000000 or len(text) > _TEXT_WIDTH:
      self.lengths[slot] = _EMPTY  # Known, without text: lines deferred.
    else:
      self.lengths[slot] = len(text)
      self.texts[slot, :len(text)] = np.frombuffer(text, np.uint8)
    self.num_texts += 1
