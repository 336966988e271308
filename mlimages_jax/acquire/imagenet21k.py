"""Extracts the ImageNet part of ML-Images from a local copy of ImageNet-21k.

The release lists ImageNet IDs (``<wnid>/<wnid>_<n>.JPEG``), not URLs. Users
hold the full ImageNet in one of three shapes, all supported:
- an extracted tree ``PATH/<wnid>/<wnid>_<n>.JPEG``;
- a folder of per-synset tars ``PATH/<wnid>.tar``;
- the single release tar (``fall11_whole.tar``, ``winter21_whole.tar.gz``):
  a tar of per-synset tars (or of ``<wnid>/`` image members).
Tars are streamed member by member (nested tars too) and never unpacked
wholesale: the release tar is 1.3 TB. Output is the downloader's layout
(``images/``, ``im_list.txt``) plus ``missing.txt`` for IDs the user's copy
lacks (the winter-2021 release removed some), with the same journal, so a
killed extraction resumes without redoing finished images.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import tarfile
import threading
import time
from typing import IO, Callable

from mlimages_jax.acquire import errors
from mlimages_jax.acquire import image_list
from mlimages_jax.acquire import journal as journal_lib
from mlimages_jax.acquire import naming
from mlimages_jax.acquire import output_dir
from mlimages_jax.acquire import validation

_SYNSET_TAR = re.compile(r"(n\d{8})\.tar$")
_WNID = re.compile(r"n\d{8}$")


def detect_layout(path: str) -> str:
  """'tree', 'tars' or 'release_tar' for an ImageNet copy at ``path``."""
  if os.path.isfile(path):
    if not tarfile.is_tarfile(path):
      raise errors.AcquireError(f"{path}: not a tar file (expected the "
                                "ImageNet release tar, a folder of <wnid>.tar "
                                "files or an extracted <wnid>/ tree)")
    return "release_tar"
  if not os.path.isdir(path):
    raise errors.AcquireError(f"{path}: no such file or folder")
  with os.scandir(path) as entries:
    for entry in entries:
      if entry.is_file() and _SYNSET_TAR.fullmatch(entry.name):
        return "tars"
  return "tree"


def _wnid_of(key: str) -> str:
  """The synset of an ID: its folder, else the ``<wnid>_`` prefix."""
  folder, _, base = key.rpartition("/")
  if folder:
    return folder.rsplit("/", 1)[-1]
  return base.split("_", 1)[0]


class _Extractor:
  """Holds the pending IDs grouped by synset and records each outcome.

  Tars are read sequentially in the calling thread; validating and the
  fsync'ed atomic writes run in ``pool`` (a bounded number in flight), since
  one fsync per image would otherwise cap extraction at a few hundred
  images per second.
  """

  def __init__(self, journal: journal_lib.Journal, images: str,
               partial: str, pool: concurrent.futures.Executor,
               in_flight: int) -> None:
    self.journal = journal
    self.images = images
    self.partial = partial
    self.pool = pool
    self.bar = None
    # wnid -> {member base name -> (item, output name)}
    self.wanted: dict[str, dict[str, tuple[image_list.ListItem, str]]] = (
        collections.defaultdict(dict))
    self.validation = validation.ValidationConfig()
    self.counts = collections.Counter()
    self._lock = threading.Lock()
    self._slots = threading.BoundedSemaphore(in_flight)
    self._errors: list[BaseException] = []

  def add(self, item: image_list.ListItem, name: str) -> None:
    base = item.key.rsplit("/", 1)[-1]
    self.wanted[_wnid_of(item.key)][base] = (item, name)

  def take(self, wnid: str, base: str
           ) -> tuple[image_list.ListItem, str] | None:
    group = self.wanted.get(wnid)
    return group.pop(base, None) if group else None

  def store(self, item: image_list.ListItem, name: str,
            read: Callable[[], bytes]) -> None:
    """Reads the member now (tars are sequential), writes it in the pool."""
    self.raise_errors()
    body = read()
    self._slots.acquire()
    future = self.pool.submit(self._write, item, name, body)
    future.add_done_callback(self._done)

  def _write(self, item: image_list.ListItem, name: str, body: bytes) -> None:
    try:
      _, width, height = validation.validate_image(body, "", self.validation)
    except validation.InvalidImage as e:
      self._finish(journal_lib.Record(item.lineno, False, 1,
                                      reason=e.reason, detail=e.detail))
      return
    validation.write_atomic(os.path.join(self.images, name), body,
                            self.partial)
    self._finish(journal_lib.Record(
        item.lineno, True, 1, name=name, stored_bytes=len(body),
        original_bytes=len(body), width=width, height=height,
        original_width=width, original_height=height))

  def _done(self, future: concurrent.futures.Future) -> None:
    self._slots.release()
    if future.exception() is not None:
      self._errors.append(future.exception())

  def missing(self, item: image_list.ListItem, detail: str) -> None:
    self._finish(journal_lib.Record(item.lineno, False, 0, reason="missing",
                                    detail=detail))

  def _finish(self, record: journal_lib.Record) -> None:
    with self._lock:
      self.journal.append(record)
      self.counts["ok" if record.ok else record.reason] += 1
      if self.bar is not None:
        self.bar.update(1)

  def raise_errors(self) -> None:
    """After the pool drained: a write error (disk full) stops the run."""
    if self._errors:
      raise errors.AcquireError(
          f"stopped on a write error ({self._errors[0]}); the journal is "
          "intact, free space and rerun the same command to resume"
      ) from self._errors[0]

  # Layouts ----------------------------------------------------------------

  def from_tree(self, root: str) -> None:
    for wnid in sorted(self.wanted):
      for base, (item, name) in sorted(self.wanted[wnid].items()):
        src = os.path.join(root, wnid, base)
        if os.path.isfile(src):
          self.store(item, name, lambda src=src: _read_file(src))
        else:
          self.missing(item, f"{wnid}/{base} not in {root}")
    self.wanted.clear()

  def from_synset_tar(self, wnid: str, fileobj: IO[bytes] | None,
                      path: str) -> None:
    """Streams one per-synset tar, extracting the wanted members."""
    if self.wanted.get(wnid):
      with tarfile.open(path if fileobj is None else None, mode="r|*",
                        fileobj=fileobj) as tar:
        for member in tar:
          if not member.isfile():
            continue
          hit = self.take(wnid, member.name.rsplit("/", 1)[-1])
          if hit is not None:
            self.store(*hit, lambda m=member: tar.extractfile(m).read())
          if not self.wanted.get(wnid):
            break
    for base, (item, _) in sorted(self.wanted.pop(wnid, {}).items()):
      self.missing(item, f"{base} not in {path}")

  def from_tars(self, folder: str) -> None:
    for wnid in sorted(self.wanted):
      path = os.path.join(folder, f"{wnid}.tar")
      if os.path.isfile(path):
        self.from_synset_tar(wnid, None, path)
      else:
        for base, (item, _) in sorted(self.wanted[wnid].items()):
          self.missing(item, f"{wnid}.tar not in {folder}")
        self.wanted[wnid] = {}

  def from_release_tar(self, path: str) -> None:
    """Streams the release tar; nested per-synset tars are streamed too.

    An uncompressed release tar is read with seeks, so synsets without
    pending IDs are skipped without reading their bytes.
    """
    seekable = not _is_compressed(path)
    with tarfile.open(path, mode="r:" if seekable else "r|*") as outer:
      for member in outer:
        if not any(self.wanted.values()):
          break
        if not member.isfile():
          continue
        match = _SYNSET_TAR.search(member.name)
        if match:
          wnid = match.group(1)
          if self.wanted.get(wnid):
            self.from_synset_tar(wnid, outer.extractfile(member),
                                 f"{path}:{member.name}")
          continue
        parts = member.name.split("/")
        if len(parts) >= 2 and _WNID.fullmatch(parts[-2]):
          hit = self.take(parts[-2], parts[-1])
          if hit is not None:
            self.store(*hit, lambda m=member: outer.extractfile(m).read())
    for wnid in sorted(self.wanted):
      for base, (item, _) in sorted(self.wanted[wnid].items()):
        self.missing(item, f"{wnid}/{base} not in {path}")
    self.wanted.clear()


def _read_file(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _is_compressed(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(6)
  return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or (
      head == b"\xfd7zXZ\x00")


def extract(id_list: str, imagenet: str, out_dir: str, *,
            skip_invalid: bool = False, num_classes: int | None = None,
            threads: int = 16, progress: bool = True) -> dict:
  """Extracts the listed IDs; returns the stats (also in stats.json).

  Files are written atomically and journaled like the downloader's, so the
  command can be killed and rerun; IDs already extracted (or found missing)
  are not looked at again.
  """
  id_list, imagenet, out_dir = map(os.fspath, (id_list, imagenet, out_dir))
  layout = detect_layout(imagenet)
  with output_dir.claim_out_dir(out_dir, {"ID_LIST": id_list,
                                         "--imagenet": imagenet}
                                ) as (images, partial):
    return _extract(id_list, imagenet, out_dir, layout, images, partial,
                    skip_invalid=skip_invalid, num_classes=num_classes,
                    threads=threads, progress=progress)


def _extract(id_list: str, imagenet: str, out_dir: str, layout: str,
             images: str, partial: str, *, skip_invalid: bool,
             num_classes: int | None, threads: int, progress: bool) -> dict:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  reader = image_list.ListReader(id_list, skip_invalid=skip_invalid,
                                 num_classes=num_classes)
  names = naming.build_name_table(reader, naming.name_from_file_name)
  line_range = (1, reader.num_lines)
  journal, missing_on_disk = output_dir.open_journal(
      out_dir, {"list_sha256": output_dir.list_fingerprint(id_list),
                "name_rule": "file", "tool": "imagenet21k"}, line_range)
  start = time.monotonic()
  bar = None
  adopted = collections.Counter()
  try:
    pending = output_dir.iter_pending(
        reader, names, output_dir.done_mask(journal, reader.num_lines),
        images, line_range, journal.append,
        check_disk=bool(journal.records) or any(os.scandir(images)),
        on_adopt=lambda: adopted.update(["adopted"]))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      extractor = _Extractor(journal, images, partial, pool, 4 * threads)
      for item, name in pending:
        extractor.add(item, name)
      todo = sum(len(group) for group in extractor.wanted.values())
      if progress:
        bar = tqdm(total=todo, unit="img", dynamic_ncols=True)
        extractor.bar = bar
      if layout == "tree":
        extractor.from_tree(imagenet)
      elif layout == "tars":
        extractor.from_tars(imagenet)
      else:
        extractor.from_release_tar(imagenet)
    extractor.raise_errors()
  finally:
    if bar is not None:
      bar.close()
    journal.close()
  elapsed = time.monotonic() - start
  finished = sum(extractor.counts.values())
  run = {"layout": layout, "elapsed_s": round(elapsed, 3),
         "items_per_s": round(finished / elapsed, 2) if elapsed else 0.0,
         "missing_on_disk": missing_on_disk, **dict(extractor.counts),
         **dict(adopted)}
  missing = sum(1 for r in journal.records.values()
                if not r.ok and r.reason == "missing")
  stats = output_dir.write_outputs(out_dir, reader, journal, line_range,
                                   "id", {"last_run": run, "missing": missing})
  _write_missing(out_dir, reader, journal)
  return stats


def _write_missing(out_dir: str, reader: image_list.ListReader,
                   journal: journal_lib.Journal) -> None:
  """DIR/missing.txt: the IDs absent from the user's copy, in input order."""
  with output_dir.atomic_text(os.path.join(out_dir, "missing.txt")) as f:
    for item in reader:
      record = journal.records.get(item.lineno)
      if record is not None and not record.ok and record.reason == "missing":
        f.write(item.key + "\n")
