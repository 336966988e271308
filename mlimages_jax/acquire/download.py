"""Resumable, validating, highly concurrent HTTP image downloader.

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
- Finished items go to the journal (``journal``) and outputs are regenerated
  from it (``output_dir``), so rerunning the same command resumes a killed
  run (also after SIGKILL).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import email.utils
import os
import queue
import random
import re
import signal
import time
import urllib.parse
from typing import Callable, Iterator, Sequence

import numpy as np

from mlimages_jax import fileio
from mlimages_jax.acquire import errors as errors_lib
from mlimages_jax.acquire import image_list
from mlimages_jax.acquire import journal as journal_lib
from mlimages_jax.acquire import naming
from mlimages_jax.acquire import output_dir
from mlimages_jax.acquire import validation as validation_lib

# Default size of the connection pool and of the per-host share of it. Flickr
# serves ML-Images' 6.9M URLs from ~16 CDN host names (farmN, cN), so the
# per-host cap lets a few hosts fill the pool without one taking all of it.
DEFAULT_WORKERS = 512
DEFAULT_PER_HOST = 128
# Flickr sends deleted photos to ".../photo_unavailable*.png" (a redirect).
DEFAULT_PLACEHOLDER_URL_PATTERNS = (r"photo_unavailable",)
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521,
                               522, 523, 524})


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
  validation: validation_lib.ValidationConfig = (
      validation_lib.ValidationConfig())
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
    self._partial = os.path.join(self.out_dir, output_dir.PARTIAL_DIR)
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

  async def _fetch(self, session, pool, item: image_list.ListItem,
                   name: str) -> journal_lib.Record:
    cfg = self.config
    scheme = urllib.parse.urlsplit(item.key).scheme.lower()
    if scheme not in ("http", "https"):
      return journal_lib.Record(item.lineno, False, 0,
                                reason="unsupported_scheme",
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
        return journal_lib.Record(item.lineno, False, attempts,
                                  reason=f.reason, detail=f.detail)
      except _Retry as r:
        if attempts > cfg.retries:
          return journal_lib.Record(item.lineno, False, attempts,
                                    reason=r.reason, detail=r.detail)
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
            pool, lambda: validation_lib.store_image(
                body, content_type, path, self._partial, cfg.validation,
                fsync=cfg.fsync))
      except validation_lib.InvalidImage as e:
        return journal_lib.Record(item.lineno, False, attempts,
                                  reason=e.reason, detail=e.detail)
      return journal_lib.Record(item.lineno, True, attempts, name=name,
                                **sizes)

  # One process's loop ----------------------------------------------------

  async def _run_async(self,
                       pending: Iterator[tuple[image_list.ListItem, str]],
                       append: Callable[[journal_lib.Record], None],
                       on_record: Callable[[journal_lib.Record], None], *,
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
      raise errors_lib.AcquireError(
          f"{self.out_dir}: stopped on a write error ({error[0]}); the "
          "journal is intact, free space or fix permissions and rerun the "
          "same command to resume") from error[0]

  def work(self, reader: image_list.ListReader, names: naming.NameTable,
           done: np.ndarray, line_range: tuple[int, int],
           append: Callable[[journal_lib.Record], None],
           on_record: Callable[[journal_lib.Record], None], *,
           check_disk: bool, part: tuple[int, int]) -> None:
    """Downloads this process's part of the pending items."""
    cfg = self.config
    count = part[1]
    pending = output_dir.iter_pending(reader, names, done, self._images,
                                      line_range, append,
                                      check_disk=check_disk, part=part,
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
    if self.config.name_rule not in naming.NAME_RULES:
      raise ValueError(f"unknown name rule {self.config.name_rule!r}")
    with output_dir.claim_out_dir(self.out_dir, {"URL_LIST": self.url_list}):
      return self._run_claimed()

  def _run_claimed(self) -> dict:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    cfg = self.config
    reader = image_list.ListReader(self.url_list,
                                   skip_invalid=cfg.skip_invalid,
                                   num_classes=cfg.num_classes)
    names = naming.build_name_table(reader, naming.NAME_RULES[cfg.name_rule])
    line_range = image_list.shard_range(reader.num_lines, cfg.shard)
    header = {"list_sha256": output_dir.list_fingerprint(self.url_list),
              "shard": list(cfg.shard), "name_rule": cfg.name_rule}
    journal, missing = output_dir.open_journal(self.out_dir, header,
                                               line_range)
    done = output_dir.done_mask(journal, reader.num_lines,
                                retry_failed=cfg.retry_failed)
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
          "missing_on_disk": missing,
      }
      # Children appended too.
      journal, _ = output_dir.open_journal(self.out_dir, header, line_range)
      journal.close()
      stats = output_dir.write_outputs(self.out_dir, reader, journal,
                                       line_range, "url", {"last_run": run})
    return stats

  def _progress(self, bar) -> None:
    if bar is not None:
      bar.update(1)
      bar.set_postfix(ok=self.run_stats["ok"],
                      failed=self.run_stats["failed"], refresh=False)

  def _run_children(self, processes: int, reader: image_list.ListReader,
                    names: naming.NameTable, done: np.ndarray,
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
      raise errors_lib.AcquireError(errors[0])
    crashed = [c.exitcode for c in children if c.exitcode]
    if crashed and not self._stop:
      raise errors_lib.AcquireError(
          f"{self.out_dir}: a download process died (exit codes {crashed}); "
          "rerun the same command to resume")


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
  reader = image_list.ListReader.with_known_invalid(url_list, invalid_lines)
  writer = journal_lib.JournalWriter(
      os.path.join(out_dir, journal_lib.JOURNAL_NAME))
  k = part[0]

  def on_record(record: journal_lib.Record) -> None:
    counters[2 * k + (0 if record.ok else 1)] += 1

  error = ""
  try:
    downloader.work(reader, names, done, line_range, writer.append, on_record,
                    check_disk=check_disk, part=part)
  except errors_lib.AcquireError as e:
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
    with fileio.open_text(path, lambda source, lineno, message: (
        errors_lib.AcquireError(f"{source}:{lineno}: {message}"))) as f:
      for lineno, line in enumerate(f, start=1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
          continue
        if not re.fullmatch(r"[0-9a-f]{64}", text):
          raise errors_lib.AcquireError(
              f"{path}:{lineno}: not a SHA-256 hex digest: {text!r}")
        out.add(text)
  return frozenset(out)
