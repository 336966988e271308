"""An output folder: claiming it, finding what is left to do, writing its lists.

A run holds the folder (``images/``, ``.partial/``, ``.lock``) alone. What is
left is known from the journal, and from disk on a resume. Output lists are
regenerated from the journal in input order, so the result is deterministic
whatever the completion order was.

The journal is checked against the disk when it is opened: an image deleted
since it was journaled is fetched again and never listed while missing. What
a later tool changed in ``im_list.txt`` (``dedup --drop --in-place``) is
recorded next to it (`record_edits`) and applied each time the list is
regenerated, so a rerun does not undo it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from mlimages_jax import fileio
from mlimages_jax.acquire import errors
from mlimages_jax.acquire import image_list
from mlimages_jax.acquire import journal as journal_lib
from mlimages_jax.acquire import naming
from mlimages_jax.acquire import validation

PARTIAL_DIR = ".partial"


IM_LIST = "im_list.txt"
_DROP, _LINE = "drop", "line"


def edits_path(list_path: str) -> str:
  """Where the later edits of a list are kept: ``.<list name>.edits``."""
  head, name = os.path.split(os.fspath(list_path))
  return os.path.join(head, f".{name}.edits")


def read_edits(list_path: str) -> dict[str, str | None]:
  """name -> its replacement line, or None for a dropped image; the last
  edit of a name wins."""
  edits: dict[str, str | None] = {}
  with contextlib.suppress(FileNotFoundError):
    with open(edits_path(list_path), encoding="utf-8") as f:
      for line in f:
        action, _, text = line.rstrip("\n").partition("\t")
        if action == _DROP:
          edits[text] = None
        elif action == _LINE:
          edits[text.split("\t", 1)[0]] = text
  return edits


def record_edits(list_path: str, dropped: Iterable[str],
                 replaced: Iterable[str]) -> None:
  """Adds edits of `list_path` (names dropped, whole lines replaced) to the
  ones recorded before, atomically."""
  path = edits_path(list_path)
  old = ""
  with contextlib.suppress(FileNotFoundError):
    with open(path, encoding="utf-8") as f:
      old = f.read()
  with atomic_text(path) as f:
    f.write(old)
    f.writelines(f"{_DROP}\t{name}\n" for name in dropped)
    f.writelines(f"{_LINE}\t{line}\n" for line in replaced)


def open_journal(out_dir: str, header: dict, line_range: tuple[int, int]
                 ) -> tuple[journal_lib.Journal, int]:
  """The folder's journal, replayed and checked against ``images/``.

  An image journaled as done but no longer on disk (deleted since) is
  forgotten, so it is fetched again and not listed meanwhile; one that a
  later ``dedup`` dropped from the list is not fetched back. Returns the
  journal and how many were forgotten; costs one stat per finished image of
  the shard.
  """
  journal = journal_lib.Journal(
      os.path.join(out_dir, journal_lib.JOURNAL_NAME), header)
  images = os.path.join(out_dir, "images")
  dropped = {name for name, line in
             read_edits(os.path.join(out_dir, IM_LIST)).items()
             if line is None}
  first, last = line_range
  gone = [lineno for lineno, r in journal.records.items()
          if r.ok and first <= lineno <= last and r.name not in dropped
          and not os.path.exists(os.path.join(images, r.name))]
  for lineno in gone:
    del journal.records[lineno]
  return journal, len(gone)


def done_mask(journal: journal_lib.Journal, num_lines: int, *,
              retry_failed: bool = False) -> np.ndarray:
  """bool[num_lines + 1], True for lines that need no more work."""
  done = np.zeros(num_lines + 1, bool)
  for lineno, record in journal.records.items():
    if lineno <= num_lines and (record.ok or not retry_failed):
      done[lineno] = True
  return done


def iter_pending(reader: image_list.ListReader, names: naming.NameTable,
                 done: np.ndarray, images_dir: str,
                 line_range: tuple[int, int],
                 append: Callable[[journal_lib.Record], None], *,
                 check_disk: bool, part: tuple[int, int] = (0, 1),
                 on_adopt: Callable[[], None] = lambda: None
                 ) -> Iterator[tuple[image_list.ListItem, str]]:
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
      sizes = validation.describe_existing(path)
      if sizes:
        append(journal_lib.Record(item.lineno, True, 0, name=name, **sizes))
        on_adopt()
        continue
    yield item, name


def atomic_text(path: str):
  """A UTF-8 text file with LF endings that appears complete or not at all."""
  return fileio.atomic_writer(path, "w", encoding="utf-8", newline="\n")


def write_outputs(out_dir: str, reader: image_list.ListReader,
                  journal: journal_lib.Journal,
                  line_range: tuple[int, int], key_column: str,
                  extra_stats: dict) -> dict:
  """Writes im_list.txt, failed.tsv and stats.json in input order.

  Streams over the list, so the outputs of millions of lines never sit in
  memory. Returns the stats.
  """
  records = journal.records
  edits = read_edits(os.path.join(out_dir, IM_LIST))
  first, last = line_range
  items = pending = dropped = 0
  with atomic_text(os.path.join(out_dir, IM_LIST)) as ok_file, \
      atomic_text(os.path.join(out_dir, "failed.tsv")) as failed_file:
    failed_file.write(f"{key_column}\treason\tattempts\tdetail\n")
    for item in reader:
      if not first <= item.lineno <= last:
        continue
      items += 1
      record = records.get(item.lineno)
      if record is None:
        pending += 1
      elif record.ok and record.name in edits:
        line = edits[record.name]
        dropped += line is None
        ok_file.write("" if line is None else line + "\n")
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
      "dropped_as_duplicates": dropped,
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


# What a run writes into its folder (the user's other files there are left).
WRITTEN = ("images", PARTIAL_DIR, fileio.LOCK_FILE, journal_lib.JOURNAL_NAME,
           IM_LIST, "failed.tsv", "stats.json", "missing.txt")


@contextlib.contextmanager
def claim_out_dir(out_dir: str, inputs: Mapping[str, str]
                  ) -> Iterator[tuple[str, str]]:
  """Prepares an output folder and holds it for one run; yields the paths.

  Refuses a folder where what the run writes would be, hold or sit inside
  one of `inputs` (``fileio.OverlapError``: e.g. the URL list saved as
  ``<out>/im_list.txt``). Creates ``images/`` and an empty ``.partial/``
  (clear error if the folder is not writable), and holds the folder
  (`fileio.exclusive_use`): a second run into it stops at once instead of
  racing this one.
  """
  fileio.check_disjoint(inputs, {f"--out {name}": os.path.join(out_dir, name)
                                 for name in WRITTEN})
  images = os.path.join(out_dir, "images")
  partial = os.path.join(out_dir, PARTIAL_DIR)
  with contextlib.ExitStack() as held:
    try:
      os.makedirs(images, exist_ok=True)
      os.makedirs(partial, exist_ok=True)
      held.enter_context(fileio.exclusive_use(out_dir, "--out"))
      for entry in os.scandir(partial):  # Leftovers of a killed run.
        os.unlink(entry.path)
    except fileio.FolderInUseError as e:
      raise errors.AcquireError(str(e)) from None
    except OSError as e:
      raise errors.AcquireError(
          f"{out_dir}: output folder is not writable: {e}") from e
    yield images, partial
