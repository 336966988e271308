"""The kill -9 safe journal of an output folder (``<out>/.journal``).

Every finished item (success or final failure) is appended to the journal. A
file reaches ``images/`` only by ``os.replace`` of a fully written, fsync'ed
temporary file, *before* its journal record. After a SIGKILL the rerun
replays the journal; an image that was renamed into place but not yet
journaled is adopted from disk, so no image is fetched twice and no partial
file is ever visible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading

from mlimages_jax.acquire import errors

JOURNAL_NAME = ".journal"
_JOURNAL_MAGIC = "#mlimages-journal v1"


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
        raise errors.AcquireError(
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
