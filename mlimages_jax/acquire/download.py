"""Resumable, validating, highly concurrent image downloader.

Turns a release URL list (``<url> <index:confidence>...`` per line) into the
manual-directory layout the TFDS builder reads (``<out>/images/<name>`` and
``<out>/im_list.txt``), plus ``failed.tsv`` and ``stats.json``.

Why it looks the way it does:
- An asyncio event loop with aiohttp keeps hundreds of connections open at
  a few MB of memory; the original's 20 threads spent most time waiting.
  Big machines run several such loops (``processes``), each taking every
  P-th pending item and appending to the same journal.
- Validation, re-encoding and file writes run in a thread pool, so the event
  loop only moves bytes.
- Every finished item (success or final failure) is appended to a journal
  (``<out>/.journal``). A file reaches ``images/`` only by ``os.replace`` of a
  fully written, fsync'ed temporary file, *before* its journal record. After a
  SIGKILL the rerun replays the journal; an image that was renamed into place
  but not yet journaled is adopted from disk, so no image is fetched twice and
  no partial file is ever visible.
- Output lists are regenerated from the journal in input order, so the result
  is deterministic whatever the completion order was.
"""

from __future__ import annotations

import array
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import hashlib
import io
import json
import os
import queue
import random
import re
import signal
import threading
import time
import urllib.parse
from typing import Callable, Iterator, Sequence

import numpy as np

from mlimages_jax import fileio

# Default size of the connection pool and of the per-host share of it. Flickr
# serves ML-Images' 6.9M URLs from ~16 CDN host names (farmN, cN), so the
# per-host cap lets a few hosts fill the pool without one taking all of it.
DEFAULT_WORKERS = 512
DEFAULT_PER_HOST = 128
# Flickr sends deleted photos to ".../photo_unavailable*.png" (a redirect).
DEFAULT_PLACEHOLDER_URL_PATTERNS = (r"photo_unavailable",)
JOURNAL_NAME = ".journal"
PARTIAL_DIR = ".partial"
_JOURNAL_MAGIC = "#mlimages-journal v1"
_MAX_NAME_BYTES = 200
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521,
                               522, 523, 524})


class AcquireError(RuntimeError):
  """A condition that stops a run (bad list, foreign journal, full disk)."""


class InvalidImage(ValueError):
  """A response body that is not a usable image; ``reason`` is a short code."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


# --------------------------------------------------------------------------
# Input lists.


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
  """Streams a release list, validating every line with ``labels.parse_line``.

  Malformed lines raise ``labels.LabelError`` (file:line) unless
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
    from mlimages_jax.data import labels  # pylint: disable=g-import-not-at-top

    validate = self._invalid_lines is None
    invalid = set() if validate else self._invalid_lines
    lineno = 0
    with open(self.path, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        if not validate and lineno in invalid:
          continue
        try:
          line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
          error = labels.LabelError(self.path, lineno, f"not UTF-8: {e}")
          if not self.skip_invalid:
            raise error from None
          invalid.add(lineno)
          continue
        if not line.strip():
          continue
        if validate:
          try:
            labels.parse_line(line, num_classes=self.num_classes,
                              source=self.path, lineno=lineno)
          except labels.LabelError:
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


# --------------------------------------------------------------------------
# File names.


def sanitize_component(text: str) -> str:
  """A path component safe on every file system: no separators, no ``..``."""
  text = re.sub(r"[^A-Za-z0-9._+-]", "_", text)
  text = re.sub(r"\.{2,}", "_", text).lstrip(".")
  return text


def _truncate_name(name: str) -> str:
  if len(name.encode()) <= _MAX_NAME_BYTES:
    return name
  stem, ext = os.path.splitext(name)
  digest = hashlib.sha1(name.encode()).hexdigest()[:10]
  keep = _MAX_NAME_BYTES - len(ext) - len(digest) - 1
  return f"{stem[:keep]}-{digest}{ext}"


def name_from_url(url: str) -> str:
  """The original downloader's rule, ``<last URL folder>_<URL file name>``.

  Sanitised: the result is a single safe path component (no ``/``, ``\\``,
  ``..``, leading dot or NUL) whatever the URL contains; a URL without a
  folder uses its host name as the folder.
  """
  parts = urllib.parse.urlsplit(url)
  segments = parts.path.split("/")
  file_name = sanitize_component(segments[-1]) or "image"
  folders = [s for s in segments[:-1] if s]
  folder = sanitize_component(folders[-1] if folders else parts.hostname or "")
  return _truncate_name(f"{folder}_{file_name}" if folder else file_name)


def name_from_file_name(key: str) -> str:
  """Only the URL's (or ID's) last path component, sanitised.

  What the shipped ``train_im_list_tiny.txt`` actually contains for Flickr
  URLs, and the natural name for ImageNet IDs (``<wnid>_<n>.JPEG``).
  """
  last = urllib.parse.urlsplit(key).path.rsplit("/", 1)[-1]
  return _truncate_name(sanitize_component(last) or "image")


NAME_RULES: dict[str, Callable[[str], str]] = {
    "folder_file": name_from_url,
    "file": name_from_file_name,
}


def _name_hash(name: str) -> int:
  digest = hashlib.blake2b(name.casefold().encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little", signed=True)


@dataclasses.dataclass(frozen=True)
class NameTable:
  """Output names of list lines: ``rule(key)`` unless renamed on collision."""
  rule: Callable[[str], str]
  overrides: dict[int, str]

  def name(self, item: ListItem) -> str:
    return self.overrides.get(item.lineno) or self.rule(item.key)


def build_name_table(reader: ListReader, rule: Callable[[str], str]
                     ) -> NameTable:
  """Resolves name collisions over the whole list, deterministically.

  Built from the full list (all shards), so every shard of a sharded
  download assigns the same names and shard outputs never collide.
  Collisions are found case-insensitively (case-folding file systems). The
  first occurrence keeps its name; the k-th later one becomes
  ``<stem>_<k><ext>`` (the first such k whose name is free). The first pass
  keeps one 8-byte hash per line; only colliding lines are looked at again.
  """
  linenos, hashes = array.array("q"), array.array("q")
  for item in reader:
    linenos.append(item.lineno)
    hashes.append(_name_hash(rule(item.key)))
  uniq, counts = np.unique(np.frombuffer(hashes, dtype=np.int64),
                           return_counts=True)
  dup = set(uniq[counts > 1].tolist())
  if not dup:
    return NameTable(rule, {})
  taken = set(uniq.tolist())
  dup_lines = {n for n, h in zip(linenos, hashes) if h in dup}
  del linenos, hashes
  overrides: dict[int, str] = {}
  seen: dict[str, int] = {}
  for item in reader:
    if item.lineno not in dup_lines:
      continue
    name = rule(item.key)
    occurrence = seen.get(name.casefold(), 0)
    seen[name.casefold()] = occurrence + 1
    if occurrence == 0:
      continue
    stem, ext = os.path.splitext(name)
    k = occurrence
    while _name_hash(_truncate_name(f"{stem}_{k}{ext}")) in taken:
      k += 1
    candidate = _truncate_name(f"{stem}_{k}{ext}")
    taken.add(_name_hash(candidate))
    overrides[item.lineno] = candidate
  return NameTable(rule, overrides)


# --------------------------------------------------------------------------
# The journal.


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
  """A finished item. ``ok`` items carry sizes; failures carry a reason."""
  lineno: int
  ok: bool
  attempts: int
  reason: str = ""
  detail: str = ""
  name: str = ""
  stored_bytes: int = 0
  original_bytes: int = 0
  width: int = 0
  height: int = 0
  original_width: int = 0
  original_height: int = 0

  def to_line(self) -> str:
    if self.ok:
      fields = ["ok", self.attempts, self.name, self.stored_bytes,
                self.original_bytes, self.width, self.height,
                self.original_width, self.original_height]
    else:
      fields = ["fail", self.attempts, self.reason, _clean(self.detail)]
    return "\t".join(str(x) for x in [self.lineno] + fields) + "\n"

  @classmethod
  def from_line(cls, line: str) -> Record:
    f = line.rstrip("\n").split("\t")
    if f[1] == "ok" and len(f) == 10:
      ints = [int(x) for x in f[4:10]]
      return cls(int(f[0]), True, int(f[2]), name=f[3], stored_bytes=ints[0],
                 original_bytes=ints[1], width=ints[2], height=ints[3],
                 original_width=ints[4], original_height=ints[5])
    if f[1] == "fail" and len(f) == 5:
      return cls(int(f[0]), False, int(f[2]), reason=f[3], detail=f[4])
    raise ValueError(f"unknown journal record {line!r}")


def _clean(text: str) -> str:
  return re.sub(r"[\t\r\n]+", " ", text)[:300]


class JournalWriter:
  """Appends records to a journal with ``os.write`` on an O_APPEND descriptor.

  One ``write`` per record: a SIGKILL loses nothing already written, and
  several processes can append to one journal (Linux serialises appends to a
  file). A background thread fsyncs every ``sync_every`` seconds (against
  power loss) so a slow disk never stalls the event loop; close() fsyncs.
  """

  def __init__(self, path: str, *, sync_every: float = 1.0):
    self.path = path
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    self._closing = threading.Event()
    self._syncer = threading.Thread(target=self._sync_loop, args=(sync_every,),
                                    daemon=True)
    self._syncer.start()

  def _sync_loop(self, every: float) -> None:
    while not self._closing.wait(every):
      os.fsync(self._fd)

  def append(self, record: Record) -> None:
    data = record.to_line().encode("utf-8")
    written = os.write(self._fd, data)
    if written != len(data):
      raise OSError(f"{self.path}: short write to the journal")

  def close(self) -> None:
    if self._fd >= 0:
      self._closing.set()
      self._syncer.join()
      os.fsync(self._fd)
      os.close(self._fd)
      self._fd = -1


class Journal(JournalWriter):
  """The journal of an output folder, replayed on open into ``records``.

  The header pins the list, the shard and the naming rule: resuming with a
  different list into the same folder is refused instead of silently mixing
  runs. A torn record (a kill mid-write) is skipped and its item redone.
  """

  def __init__(self, path: str, header: dict, *, sync_every: float = 1.0):
    self.records: dict[int, Record] = {}
    self.torn = 0
    header_line = f"{_JOURNAL_MAGIC}\t{json.dumps(header, sort_keys=True)}\n"
    if os.path.exists(path):
      self._replay(path, header_line)
    else:
      tmp = f"{path}.tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(header_line)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    super().__init__(path, sync_every=sync_every)

  def _replay(self, path: str, header_line: str) -> None:
    """Streams the journal (millions of lines) into ``records``."""
    offset = 0
    with open(path, "rb") as f:
      first = f.readline()
      if first.decode("utf-8", errors="replace") != header_line:
        raise AcquireError(
            f"{path}: this output folder was started with other arguments "
            f"(journal header {first.strip()!r}, expected "
            f"{header_line.strip()!r}); use another --out or the same list, "
            "shard and naming rule")
      offset = len(first)
      for raw in f:
        if not raw.endswith(b"\n"):  # Torn final record of a killed run.
          break
        offset += len(raw)
        try:
          record = Record.from_line(raw.decode("utf-8"))
        except (ValueError, IndexError, UnicodeDecodeError):
          self.torn += 1
          continue
        self.records[record.lineno] = record
    if offset < os.path.getsize(path):  # Cut it so appends stay lines.
      os.truncate(path, offset)
      self.torn += 1

  def append(self, record: Record) -> None:
    super().append(record)
    self.records[record.lineno] = record


# --------------------------------------------------------------------------
# Validation and storage (run in worker threads).

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(body: bytes) -> str | None:
  """Image format from magic bytes, or None."""
  for magic, fmt in _MAGIC:
    if body.startswith(magic):
      return fmt
  if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
    return "WEBP"
  return None


def _looks_like_html(body: bytes, content_type: str) -> bool:
  head = body[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
  return ("html" in content_type.lower() or head.startswith(b"<!doctype html")
          or head.startswith(b"<html") or head.startswith(b"<?xml")
          or head.startswith(b"<head") or head.startswith(b"<body"))


def _is_truncated(body: bytes, fmt: str) -> bool:
  """True when the format's end marker is missing (cut-off transfer/file)."""
  tail = body[-4096:]
  if fmt == "JPEG":
    return b"\xff\xd9" not in tail
  if fmt == "PNG":
    return b"IEND" not in tail
  if fmt == "GIF":
    return not body.rstrip(b"\x00").endswith(b"\x3b")
  return False


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
  placeholder_hashes: frozenset[str] = frozenset()
  verify: str = "header"  # "header" | "full"
  max_side: int | None = None
  quality: int = 90


def validate_image(body: bytes, content_type: str,
                   config: ValidationConfig) -> tuple[str, int, int]:
  """Checks a 200 response body; returns (format, width, height).

  Raises InvalidImage with a reason code: empty_body, html_page,
  not_an_image, placeholder_image, undecodable, truncated_image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if not body:
    raise InvalidImage("empty_body")
  fmt = sniff_format(body)
  if fmt is None:
    if _looks_like_html(body, content_type):
      raise InvalidImage("html_page", content_type)
    raise InvalidImage("not_an_image", repr(body[:16]))
  if config.placeholder_hashes:
    if hashlib.sha256(body).hexdigest() in config.placeholder_hashes:
      raise InvalidImage("placeholder_image")
  try:
    with Image.open(io.BytesIO(body)) as img:
      width, height = img.size
      if config.verify == "full":
        img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        img.load()
  except Exception as e:  # PIL raises many types for broken data.
    raise InvalidImage("undecodable", f"{type(e).__name__}: {e}") from None
  if width <= 0 or height <= 0:
    raise InvalidImage("undecodable", f"size {width}x{height}")
  if _is_truncated(body, fmt):
    raise InvalidImage("truncated_image", fmt)
  return fmt, width, height


def shrink(body: bytes, fmt: str, max_side: int, quality: int
           ) -> tuple[bytes, int, int]:
  """Re-encodes an image whose longer side exceeds ``max_side``.

  JPEG stays JPEG (quality ``quality``), PNG stays PNG, everything else
  becomes JPEG. Returns (bytes, width, height).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(io.BytesIO(body)) as img:
    img.draft("RGB", (max_side, max_side))  # Fast DCT scaling for JPEG.
    img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "PNG":
      img.save(out, "PNG", optimize=False)
    else:
      img.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue(), img.size[0], img.size[1]


def write_atomic(path: str, data: bytes, partial_dir: str, *,
                 fsync: bool = True) -> None:
  """Writes ``data`` to ``path`` so that it is either absent or complete."""
  suffix = f"{os.getpid()}.{random.getrandbits(32):08x}"
  tmp = os.path.join(partial_dir, f"{os.path.basename(path)}.{suffix}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise


def store_image(body: bytes, content_type: str, path: str, partial_dir: str,
                config: ValidationConfig, *, fsync: bool = True) -> dict:
  """Validate, optionally shrink, write atomically; returns the size fields."""
  fmt, width, height = validate_image(body, content_type, config)
  data, out_w, out_h = body, width, height
  if config.max_side and max(width, height) > config.max_side:
    data, out_w, out_h = shrink(body, fmt, config.max_side, config.quality)
  write_atomic(path, data, partial_dir, fsync=fsync)
  return dict(stored_bytes=len(data), original_bytes=len(body), width=out_w,
              height=out_h, original_width=width, original_height=height)


def describe_existing(path: str) -> dict:
  """Size fields for a file adopted from disk (renamed, not yet journaled)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  size = os.path.getsize(path)
  try:
    with Image.open(path) as img:
      width, height = img.size
  except Exception:  # Unreadable: the caller refetches it.
    return {}
  return dict(stored_bytes=size, original_bytes=size, width=width,
              height=height, original_width=width, original_height=height)


# --------------------------------------------------------------------------
# Output lists (regenerated from the journal, in input order).


def done_mask(journal: Journal, num_lines: int, *,
              retry_failed: bool = False) -> np.ndarray:
  """bool[num_lines + 1], True for lines that need no more work."""
  done = np.zeros(num_lines + 1, bool)
  for lineno, record in journal.records.items():
    if lineno <= num_lines and (record.ok or not retry_failed):
      done[lineno] = True
  return done


def iter_pending(reader: ListReader, names: NameTable, done: np.ndarray,
                 images_dir: str, line_range: tuple[int, int],
                 append: Callable[[Record], None], *, check_disk: bool,
                 part: tuple[int, int] = (0, 1),
                 on_adopt: Callable[[], None] = lambda: None
                 ) -> Iterator[tuple[ListItem, str]]:
  """Yields (item, name) for the lines of ``line_range`` still to be done.

  ``part=(k, P)`` keeps every P-th pending item starting at the k-th, so P
  processes split the work without talking to each other. With
  ``check_disk`` (a resume), an image that a killed run renamed into
  ``images/`` but did not journal is adopted (journaled from disk through
  ``append``) instead of being fetched again; a fresh run does not stat
  millions of files.
  """
  first, last = line_range
  index, count = part
  position = -1
  for item in reader:
    if item.lineno < first:
      continue
    if item.lineno > last:
      break
    if done[item.lineno]:
      continue
    position += 1
    if position % count != index:
      continue
    name = names.name(item)
    path = os.path.join(images_dir, name)
    if check_disk and os.path.exists(path):
      sizes = describe_existing(path)
      if sizes:
        append(Record(item.lineno, True, 0, name=name, **sizes))
        on_adopt()
        continue
    yield item, name


def atomic_text(path: str):
  """A UTF-8 text file with LF endings that appears complete or not at all."""
  return fileio.atomic_writer(path, "w", encoding="utf-8", newline="\n")


def write_outputs(out_dir: str, reader: ListReader, journal: Journal,
                  line_range: tuple[int, int], key_column: str,
                  extra_stats: dict) -> dict:
  """Writes im_list.txt, failed.tsv and stats.json in input order.

  Streams over the list, so the outputs of millions of lines never sit in
  memory. Returns the stats.
  """
  records = journal.records
  first, last = line_range
  items = pending = 0
  with atomic_text(os.path.join(out_dir, "im_list.txt")) as ok_file, \
      atomic_text(os.path.join(out_dir, "failed.tsv")) as failed_file:
    failed_file.write(f"{key_column}\treason\tattempts\tdetail\n")
    for item in reader:
      if not first <= item.lineno <= last:
        continue
      items += 1
      record = records.get(item.lineno)
      if record is None:
        pending += 1
      elif record.ok:
        ok_file.write(f"{record.name}\t{item.annotations}\n"
                      if item.annotations else f"{record.name}\n")
      else:
        failed_file.write(f"{item.key}\t{record.reason}\t{record.attempts}"
                          f"\t{record.detail}\n")
  reasons = collections.Counter(r.reason for r in records.values() if not r.ok)
  oks = [r for r in records.values() if r.ok]
  resized = [r for r in oks
             if (r.width, r.height) != (r.original_width, r.original_height)]
  stats = {
      "items": items,
      "ok": len(oks),
      "failed": sum(reasons.values()),
      "failed_by_reason": dict(sorted(reasons.items())),
      "pending": pending,
      "invalid_lines": reader.invalid,
      "bytes": sum(r.stored_bytes for r in oks),
      "original_bytes": sum(r.original_bytes for r in oks),
      "resized": len(resized),
      "resized_original_bytes": sum(r.original_bytes for r in resized),
      "resized_max_original_side": max(
          (max(r.original_width, r.original_height) for r in resized),
          default=0),
      "attempts": sum(r.attempts for r in records.values()),
  }
  stats.update(extra_stats)
  with atomic_text(os.path.join(out_dir, "stats.json")) as f:
    f.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
  return stats


def list_fingerprint(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


@contextlib.contextmanager
def claim_out_dir(out_dir: str) -> Iterator[tuple[str, str]]:
  """Prepares an output folder and holds it for one run; yields the paths.

  Creates ``images/`` and an empty ``.partial/`` (clear error if the folder
  is not writable), and holds an exclusive lock on ``<out>/.lock`` so that a
  second run into the same folder stops at once instead of racing this one.
  The kernel drops the lock when the process dies, even by SIGKILL.
  """
  import fcntl  # pylint: disable=g-import-not-at-top

  images = os.path.join(out_dir, "images")
  partial = os.path.join(out_dir, PARTIAL_DIR)
  try:
    os.makedirs(images, exist_ok=True)
    os.makedirs(partial, exist_ok=True)
    lock = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT)
  except OSError as e:
    raise AcquireError(f"{out_dir}: output folder is not writable: {e}") from e
  try:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise AcquireError(f"{out_dir}: another run is writing into this "
                         "folder (wait for it or stop it first)") from None
    try:
      for entry in os.scandir(partial):  # Leftovers of a killed run.
        os.unlink(entry.path)
    except OSError as e:
      raise AcquireError(f"{out_dir}: output folder is not writable: "
                         f"{e}") from e
    yield images, partial
  finally:
    os.close(lock)


# --------------------------------------------------------------------------
# HTTP.


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
  """Everything that shapes a download run (the CLI flags)."""
  workers: int = DEFAULT_WORKERS
  per_host: int = DEFAULT_PER_HOST
  timeout: float = 30.0
  retries: int = 3
  backoff: float = 1.0
  max_backoff: float = 60.0
  max_retry_after: float = 300.0
  max_redirects: int = 5
  max_bytes: int = 200 << 20
  shard: tuple[int, int] = (0, 1)
  skip_invalid: bool = False
  num_classes: int | None = None
  name_rule: str = "folder_file"
  placeholder_url_patterns: Sequence[str] = DEFAULT_PLACEHOLDER_URL_PATTERNS
  validation: ValidationConfig = ValidationConfig()
  retry_failed: bool = False
  fsync: bool = True
  processes: int = 0  # Event-loop processes; 0 = one per 4 CPUs, 1 to 4.
  threads: int = 16  # Validation/write threads in all (mostly in fsync).
  user_agent: str = "mlimages-jax-downloader/0.1 (+https://github.com/)"
  progress: bool = True
  seed: int | None = None


class _Retry(Exception):

  def __init__(self, reason: str, detail: str = "", delay: float | None = None):
    super().__init__(reason)
    self.reason = reason
    self.detail = detail
    self.delay = delay


class _Fail(Exception):

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(reason)
    self.reason = reason
    self.detail = detail


def parse_retry_after(value: str | None, now: float | None = None
                      ) -> float | None:
  """Seconds to wait from a Retry-After header (delta seconds or HTTP date)."""
  if not value:
    return None
  value = value.strip()
  if value.isdigit():
    return float(value)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  if when is None:
    return None
  return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float,
                  rng: random.Random) -> float:
  """Exponential backoff with full jitter: uniform(0, min(cap, base*2**k))."""
  return rng.uniform(0.0, min(cap, base * (2 ** (attempt - 1))))


def default_processes() -> int:
  """One event loop per 4 CPUs (1..4): the rest validate, write, serve."""
  return max(1, min(4, (os.cpu_count() or 1) // 4))


class Downloader:
  """One process's share of a download run (see module docstring).

  ``run`` (the coordinating process) replays the journal and either works
  itself or starts ``processes`` children; each child owns an event loop,
  ``workers / processes`` connections and every P-th pending item, and
  appends to the same journal. One event loop tops out around a thousand
  small images per second of Python work, hence several.
  """

  def __init__(self, url_list: str, out_dir: str, config: DownloadConfig):
    self.url_list = os.fspath(url_list)
    self.out_dir = os.fspath(out_dir)
    self.config = config
    self._rng = random.Random(config.seed)
    self._placeholder_res = [re.compile(p)
                             for p in config.placeholder_url_patterns]
    self._images = os.path.join(self.out_dir, "images")
    self._partial = os.path.join(self.out_dir, PARTIAL_DIR)
    self._stop = False
    self.run_stats: collections.Counter = collections.Counter()
    self.retry_reasons: collections.Counter = collections.Counter()
    # Wall-clock span of the download loops (all processes): the rate
    # excludes process start-up, as img2dataset's own timing does.
    self.window = [float("inf"), 0.0]

  # The per-item HTTP exchange -------------------------------------------

  async def _attempt(self, session, url: str) -> tuple[bytes, str]:
    import aiohttp  # pylint: disable=g-import-not-at-top

    cfg = self.config
    try:
      async with session.get(url, allow_redirects=True,
                             max_redirects=cfg.max_redirects) as resp:
        for hop in list(resp.history) + [resp]:
          target = str(hop.url)
          if any(p.search(target) for p in self._placeholder_res):
            raise _Fail("placeholder_redirect", target)
        if resp.status in _RETRYABLE_STATUS:
          delay = parse_retry_after(resp.headers.get("Retry-After"))
          raise _Retry(f"http_{resp.status}", delay=delay)
        if resp.status != 200:
          raise _Fail(f"http_{resp.status}")
        length = resp.content_length
        if length is not None and length > cfg.max_bytes:
          raise _Fail("too_large", f"{length} bytes")
        chunks, total = [], 0
        async for chunk in resp.content.iter_chunked(1 << 18):
          total += len(chunk)
          if total > cfg.max_bytes:
            raise _Fail("too_large", f"> {cfg.max_bytes} bytes")
          chunks.append(chunk)
        return b"".join(chunks), resp.headers.get("Content-Type", "")
    except aiohttp.TooManyRedirects as e:
      raise _Fail("too_many_redirects", str(e)) from None
    except aiohttp.InvalidURL as e:  # Includes redirects to non-http URLs.
      raise _Fail("invalid_url", str(e)) from None
    except aiohttp.ClientPayloadError as e:
      raise _Retry("truncated_transfer", str(e)) from None
    except asyncio.TimeoutError:
      raise _Retry("timeout") from None
    except aiohttp.ClientConnectorDNSError as e:
      raise _Fail("dns_error", str(e)) from None
    except (aiohttp.ClientError, OSError) as e:
      raise _Retry("connection_error", f"{type(e).__name__}: {e}") from None

  async def _fetch(self, session, pool, item: ListItem, name: str) -> Record:
    cfg = self.config
    scheme = urllib.parse.urlsplit(item.key).scheme.lower()
    if scheme not in ("http", "https"):
      return Record(item.lineno, False, 0, reason="unsupported_scheme",
                    detail=scheme or "(none)")
    loop = asyncio.get_running_loop()
    path = os.path.join(self._images, name)
    attempts = 0
    while True:
      attempts += 1
      self.run_stats["requests"] += 1
      try:
        body, content_type = await self._attempt(session, item.key)
      except _Fail as f:
        return Record(item.lineno, False, attempts, reason=f.reason,
                      detail=f.detail)
      except _Retry as r:
        if attempts > cfg.retries:
          return Record(item.lineno, False, attempts, reason=r.reason,
                        detail=r.detail)
        self.run_stats["retries"] += 1
        self.retry_reasons[r.reason] += 1
        delay = (min(r.delay, cfg.max_retry_after) if r.delay is not None
                 else backoff_delay(attempts, cfg.backoff, cfg.max_backoff,
                                    self._rng))
        await asyncio.sleep(delay)
        continue
      self.run_stats["downloaded_bytes"] += len(body)
      try:
        sizes = await loop.run_in_executor(
            pool, lambda: store_image(body, content_type, path,
                                      self._partial, cfg.validation,
                                      fsync=cfg.fsync))
      except InvalidImage as e:
        return Record(item.lineno, False, attempts, reason=e.reason,
                      detail=e.detail)
      return Record(item.lineno, True, attempts, name=name, **sizes)

  # One process's loop ----------------------------------------------------

  async def _run_async(self, pending: Iterator[tuple[ListItem, str]],
                       append: Callable[[Record], None],
                       on_record: Callable[[Record], None], *,
                       workers: int, per_host: int, threads: int) -> None:
    import aiohttp  # pylint: disable=g-import-not-at-top

    cfg = self.config
    connector = aiohttp.TCPConnector(limit=workers, limit_per_host=per_host,
                                     ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout * 10,
                                    sock_connect=cfg.timeout,
                                    sock_read=cfg.timeout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        loop.add_signal_handler(sig, self._request_stop)
      except (NotImplementedError, RuntimeError):  # Not the main thread.
        pass
    parent = os.getppid()
    error: list[BaseException] = []

    async def worker(session, pool):
      while not self._stop and not error:
        if os.getppid() != parent:  # Coordinator gone (killed): stop.
          self._stop = True
          return
        try:
          item, name = next(pending)
        except StopIteration:
          return
        try:
          record = await self._fetch(session, pool, item, name)
          append(record)
        except OSError as e:  # Disk full, unwritable folder: stop cleanly.
          error.append(e)
          return
        self.run_stats["ok" if record.ok else "failed"] += 1
        on_record(record)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      async with aiohttp.ClientSession(
          connector=connector, timeout=timeout, auto_decompress=True,
          headers={"User-Agent": cfg.user_agent}) as session:
        await asyncio.gather(*(worker(session, pool) for _ in range(workers)))
    if error:
      raise AcquireError(
          f"{self.out_dir}: stopped on a write error ({error[0]}); the "
          "journal is intact, free space or fix permissions and rerun the "
          "same command to resume") from error[0]

  def work(self, reader: ListReader, names: NameTable, done: np.ndarray,
           line_range: tuple[int, int], append: Callable[[Record], None],
           on_record: Callable[[Record], None], *, check_disk: bool,
           part: tuple[int, int]) -> None:
    """Downloads this process's part of the pending items."""
    cfg = self.config
    count = part[1]
    pending = iter_pending(reader, names, done, self._images, line_range,
                           append, check_disk=check_disk, part=part,
                           on_adopt=self._count_adopted)
    threads = cfg.threads
    self.window[0] = min(self.window[0], time.time())
    try:
      asyncio.run(self._run_async(
          pending, append, on_record,
          workers=max(1, -(-cfg.workers // count)),
          per_host=max(1, -(-cfg.per_host // count)),
          threads=max(1, -(-threads // count))))
    finally:
      self.window[1] = max(self.window[1], time.time())

  def _count_adopted(self) -> None:
    self.run_stats["adopted"] += 1

  def _request_stop(self) -> None:
    self._stop = True

  # The coordinating process ----------------------------------------------

  def run(self) -> dict:
    """Downloads the pending items; returns the stats written to stats.json."""
    if self.config.name_rule not in NAME_RULES:
      raise ValueError(f"unknown name rule {self.config.name_rule!r}")
    with claim_out_dir(self.out_dir):
      return self._run_claimed()

  def _run_claimed(self) -> dict:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    cfg = self.config
    reader = ListReader(self.url_list, skip_invalid=cfg.skip_invalid,
                        num_classes=cfg.num_classes)
    names = build_name_table(reader, NAME_RULES[cfg.name_rule])
    line_range = shard_range(reader.num_lines, cfg.shard)
    header = {"list_sha256": list_fingerprint(self.url_list),
              "shard": list(cfg.shard), "name_rule": cfg.name_rule}
    journal = Journal(os.path.join(self.out_dir, JOURNAL_NAME), header)
    done = done_mask(journal, reader.num_lines, retry_failed=cfg.retry_failed)
    check_disk = bool(journal.records) or any(os.scandir(self._images))
    processes = cfg.processes or default_processes()
    first, last = line_range
    invalid_here = sum(first <= n <= last for n in reader.invalid_lines)
    bar = tqdm(total=max(0, last - first + 1) - invalid_here,
               initial=int(done[first:last + 1].sum()), unit="img",
               dynamic_ncols=True, smoothing=0.05) if cfg.progress else None
    start = time.monotonic()
    try:
      if processes == 1:
        self.work(reader, names, done, line_range, journal.append,
                  lambda _: self._progress(bar), check_disk=check_disk,
                  part=(0, 1))
      else:
        journal.close()
        self._run_children(processes, reader, names, done, line_range,
                           check_disk, bar)
    finally:
      journal.close()
      if bar is not None:
        bar.close()
      elapsed = time.monotonic() - start
      finished = self.run_stats["ok"] + self.run_stats["failed"]
      loops = max(0.0, self.window[1] - self.window[0])
      run = {
          "processes": processes,
          "elapsed_s": round(elapsed, 3),
          "download_s": round(loops, 3),
          "items_per_s": round(finished / loops, 2) if loops else 0.0,
          "bytes_per_s": round(self.run_stats["downloaded_bytes"] / loops,
                               1) if loops else 0.0,
          **{k: int(v) for k, v in sorted(self.run_stats.items())},
          "retry_reasons": dict(sorted(self.retry_reasons.items())),
          "interrupted": self._stop,
      }
      journal = Journal(journal.path, header)  # Children appended too.
      journal.close()
      stats = write_outputs(self.out_dir, reader, journal, line_range, "url",
                            {"last_run": run})
    return stats

  def _progress(self, bar) -> None:
    if bar is not None:
      bar.update(1)
      bar.set_postfix(ok=self.run_stats["ok"],
                      failed=self.run_stats["failed"], refresh=False)

  def _run_children(self, processes: int, reader: ListReader,
                    names: NameTable, done: np.ndarray,
                    line_range: tuple[int, int], check_disk: bool,
                    bar) -> None:
    """Starts one child per part, shows their progress, merges their stats."""
    import multiprocessing  # pylint: disable=g-import-not-at-top

    ctx = multiprocessing.get_context("spawn")  # Safe with threads/JAX.
    counters = ctx.Array("q", 2 * processes, lock=False)
    results = ctx.Queue()
    children = [ctx.Process(
        target=_child_main, daemon=True,
        args=(self.url_list, self.out_dir, self.config,
              reader.invalid_lines, names, done, line_range, check_disk,
              (k, processes), counters, results))
                for k in range(processes)]
    for child in children:
      child.start()

    def forward(signum, _frame):
      self._stop = True
      for child in children:
        if child.is_alive():
          os.kill(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    errors, shown = [], 0
    try:
      pending_results = processes
      while pending_results:
        try:
          stats, retry_reasons, window, error = results.get(timeout=0.25)
          self.window = [min(self.window[0], window[0]),
                         max(self.window[1], window[1])]
          self.run_stats.update(stats)
          self.retry_reasons.update(retry_reasons)
          if error:
            errors.append(error)
          pending_results -= 1
        except queue.Empty:
          if not any(child.is_alive() for child in children):
            break
        finished = sum(counters)
        if bar is not None and finished > shown:
          bar.update(finished - shown)
          bar.set_postfix(ok=sum(counters[0::2]),
                          failed=sum(counters[1::2]), refresh=False)
          shown = finished
      for child in children:
        child.join()
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    if errors:
      raise AcquireError(errors[0])
    crashed = [c.exitcode for c in children if c.exitcode]
    if crashed and not self._stop:
      raise AcquireError(f"{self.out_dir}: a download process died (exit "
                         f"codes {crashed}); rerun the same command to resume")


def _die_with_parent() -> None:
  """Linux: SIGKILL this process when its parent dies (a SIGKILLed run)."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # Elsewhere the worker loop's getppid() check stops it.


def _child_main(url_list, out_dir, config, invalid_lines, names, done,
                line_range, check_disk, part, counters, results) -> None:
  """Entry point of a download child process."""
  parent = os.getppid()
  _die_with_parent()
  if os.getppid() != parent:
    return
  downloader = Downloader(url_list, out_dir, config)
  reader = ListReader.with_known_invalid(url_list, invalid_lines)
  writer = JournalWriter(os.path.join(out_dir, JOURNAL_NAME))
  k = part[0]

  def on_record(record: Record) -> None:
    counters[2 * k + (0 if record.ok else 1)] += 1

  error = ""
  try:
    downloader.work(reader, names, done, line_range, writer.append, on_record,
                    check_disk=check_disk, part=part)
  except AcquireError as e:
    error = str(e)
  finally:
    writer.close()
    results.put((dict(downloader.run_stats), dict(downloader.retry_reasons),
                 downloader.window, error))


def download(url_list: str, out_dir: str,
             config: DownloadConfig | None = None) -> dict:
  """Library entry point (the ``mlimages download`` command)."""
  return Downloader(url_list, out_dir, config or DownloadConfig()).run()


def load_placeholder_hashes(paths: Sequence[str], hashes: Sequence[str]
                            ) -> frozenset[str]:
  """SHA-256 hex digests from files (one per line, ``#`` comments) and flags."""
  out = {h.strip().lower() for h in hashes if h.strip()}
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
          continue
        if not re.fullmatch(r"[0-9a-f]{64}", text):
          raise AcquireError(f"{path}:{lineno}: not a SHA-256 hex digest: "
                             f"{text!r}")
        out.add(text)
  return frozenset(out)
