"""Finds repeated images in image lists; optionally drops them.

ImageNet stores some images twice under different IDs (an image of a child
class also saved in its parent's folder), so ML-Images has repeats the
original never removed (ML_IMAGES.md §1). Exact repeats are found by the
SHA-256 of the file bytes; near repeats (re-encoded or resized copies) by a
64-bit perceptual hash (pHash: DCT of a 32x32 grey thumbnail; or dHash:
gradient signs of a 9x8 one) within a Hamming distance.

Scale: per-image results live in NumPy arrays (not Python objects), hashes
are cached per input folder (``.dedup-cache.tsv``, keyed by name, size and
mtime) so a killed run resumes without re-reading finished files, and near
pairs are found with multi-index hashing (pigeonhole over t+1 chunks of the
64 bits), not all-pairs comparison.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import os
import shutil
from typing import Iterable, Iterator, Sequence

import numpy as np

from mlimages_jax import decoding
from mlimages_jax import fileio
from mlimages_jax.acquire import errors
from mlimages_jax.acquire import image_list
from mlimages_jax.acquire import output_dir
from mlimages_jax.data import annotations as annotations_lib

CACHE_NAME = ".dedup-cache.tsv"
_HASH_KINDS = ("phash", "dhash")


# --------------------------------------------------------------------------
# Perceptual hashes.


def _grey(img, size: tuple[int, int]) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  img.draft("L", (size[0] * 4, size[1] * 4))  # JPEG: decode at 1/2..1/8.
  grey = decoding.to_8bit(img).convert("L").resize(size,
                                                   Image.Resampling.LANCZOS)
  return np.asarray(grey, dtype=np.float64)


def _bits_to_int(bits: np.ndarray) -> int:
  return int.from_bytes(np.packbits(bits.astype(np.uint8).ravel()).tobytes(),
                        "big")


def _dct_matrix(n: int) -> np.ndarray:
  k = np.arange(n)[:, None]
  x = np.arange(n)[None, :]
  m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
  m[0] /= np.sqrt(2.0)
  return m


_DCT32 = _dct_matrix(32)


def phash(img) -> int:
  """pHash: signs of the 8x8 lowest DCT frequencies against their median.

  The median excludes the DC term (overall brightness), so a uniform
  brightness change does not move the hash.
  """
  pixels = _grey(img, (32, 32))
  coeffs = (_DCT32 @ pixels @ _DCT32.T)[:8, :8]
  median = np.median(coeffs.ravel()[1:])
  return _bits_to_int(coeffs > median)


def dhash(img) -> int:
  """dHash: whether each pixel of a 9x8 thumbnail is brighter than its left."""
  pixels = _grey(img, (9, 8))
  return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def hamming(a: int, b: int) -> int:
  return (a ^ b).bit_count()


def hash_file(path: str, kind: str | None) -> tuple[bytes, int]:
  """(SHA-256 digest, perceptual hash or -1) of an image file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with open(path, "rb") as f:
    data = f.read()
  digest = hashlib.sha256(data).digest()
  if kind is None:
    return digest, -1
  try:  # The decode policy first: no bomb is decoded, even to hash it.
    with decoding.BUDGET.reserve(decoding.read_header(data).pixels), \
        Image.open(io.BytesIO(data)) as img:
      value = phash(img) if kind == "phash" else dhash(img)
  except Exception:  # Undecodable or refused: still deduplicated exactly.
    value = -1
  return digest, value


# --------------------------------------------------------------------------
# Near-duplicate search.


def near_pairs(hashes: np.ndarray, threshold: int) -> Iterator[tuple[int, int]]:
  """Index pairs (i < j) of distinct 64-bit hashes within ``threshold`` bits.

  Multi-index hashing: split the 64 bits into threshold+1 chunks; two hashes
  within the threshold agree exactly on at least one chunk (pigeonhole), so
  only hashes sharing a chunk value are compared.
  """
  if not 0 <= threshold < 64:
    raise ValueError(f"threshold must be in 0..63, got {threshold}")
  values = hashes.astype(np.uint64)
  bounds = np.linspace(0, 64, threshold + 2).astype(int)
  seen: set[tuple[int, int]] = set()
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    if hi == lo:
      continue
    mask = np.uint64((1 << (hi - lo)) - 1)
    keys = (values >> np.uint64(lo)) & mask
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for s, e in zip(starts, ends):
      if e - s < 2:
        continue
      bucket = order[s:e]
      vals = values[bucket]
      for start in range(0, len(bucket), 512):  # Bounded k x 512 blocks.
        dist = np.bitwise_count(vals[start:start + 512, None] ^ vals[None, :])
        rows, cols = np.nonzero(dist <= threshold)
        later = cols > rows + start
        for a, b in zip(bucket[rows[later] + start], bucket[cols[later]]):
          pair = (int(min(a, b)), int(max(a, b)))
          if pair not in seen:
            seen.add(pair)
            yield pair


class _UnionFind:

  def __init__(self, n: int):
    self.parent = np.arange(n)

  def find(self, i: int) -> int:
    root = i
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[i] != root:
      self.parent[i], i = root, self.parent[i]
    return root

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:  # The smaller index (earlier in input order) stays root.
      self.parent[max(ra, rb)] = min(ra, rb)


# --------------------------------------------------------------------------
# Inputs, cache, report.


@dataclasses.dataclass(frozen=True)
class Input:
  """An image list and the folder holding its images."""
  list_path: str
  images_dir: str


def resolve_input(path: str) -> Input:
  """DIR (with im_list.txt and images/) or a list file next to images/."""
  path = os.fspath(path)
  if os.path.isdir(path):
    list_path = os.path.join(path, "im_list.txt")
    if not os.path.isfile(list_path):
      raise errors.AcquireError(f"{path}: no im_list.txt in this folder")
    return Input(list_path, os.path.join(path, "images"))
  if not os.path.isfile(path):
    raise errors.AcquireError(f"{path}: no such list or folder")
  return Input(path, os.path.join(os.path.dirname(os.path.abspath(path)),
                                  "images"))


class _HashCache:
  """Append-only per-folder cache: (name, size, mtime) -> sha256, phash.

  A perceptual value of -1 under the same hash kind records an undecodable
  image (a valid result, not a miss). A torn last line is ignored.
  """

  def __init__(self, folder: str, kind: str | None):
    self.path = os.path.join(folder, CACHE_NAME)
    self.kind = kind or "-"
    self.entries: dict[str, tuple[int, int, bytes, str, int]] = {}
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        for line in f:
          fields = line.rstrip("\n").split("\t")
          if len(fields) != 6 or not line.endswith("\n"):
            continue
          name, size, mtime, sha, kind, value = fields
          self.entries[name] = (int(size), int(mtime), bytes.fromhex(sha),
                                kind, int(value))
    self._file = None

  def get(self, name: str, stat: os.stat_result) -> tuple[bytes, int] | None:
    hit = self.entries.get(name)
    if hit is None or hit[:2] != (stat.st_size, stat.st_mtime_ns):
      return None
    if self.kind == "-":
      return hit[2], -1
    return (hit[2], hit[4]) if hit[3] == self.kind else None

  def put(self, name: str, stat: os.stat_result, digest: bytes,
          value: int) -> None:
    if self._file is None:
      self._file = open(self.path, "a", encoding="utf-8")
    self._file.write(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\t"
                     f"{digest.hex()}\t{self.kind}\t{value}\n")

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


@dataclasses.dataclass
class Report:
  """Duplicate groups over the inputs' images.

  Per image (input order across inputs): ``source`` (input index),
  ``lineno``, ``digest`` (first 16 bytes of SHA-256 as two uint64),
  ``perceptual`` (uint64 bits, or -1 as int64 when unknown). ``groups`` lists
  image indices (first = kept) for every group of >= 2 images.
  """
  inputs: list[Input]
  source: np.ndarray
  lineno: np.ndarray
  digest: np.ndarray
  perceptual: np.ndarray
  groups: list[list[int]]
  hash_kind: str | None
  missing: int = 0

  @property
  def num_images(self) -> int:
    return len(self.lineno)

  def is_exact(self, group: Sequence[int]) -> bool:
    return bool((self.digest[group] == self.digest[group[0]]).all())

  @property
  def num_exact_groups(self) -> int:
    return sum(self.is_exact(g) for g in self.groups)

  @property
  def num_redundant(self) -> int:
    return sum(len(g) - 1 for g in self.groups)


def find_duplicates(inputs: Sequence[str], *, near: bool = False,
                    hash_kind: str = "phash", threshold: int = 8,
                    workers: int = 0, progress: bool = True) -> Report:
  """Hashes every listed image and groups the duplicates."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  if hash_kind not in _HASH_KINDS:
    raise ValueError(f"hash must be one of {_HASH_KINDS}")
  kind = hash_kind if near else None
  resolved = [resolve_input(p) for p in inputs]
  source, linenos, digests, values = [], [], [], []
  missing = 0
  workers = workers or 2 * (os.cpu_count() or 1)
  bar = tqdm(unit="img", dynamic_ncols=True, disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for index, inp in enumerate(resolved):
      cache = _HashCache(os.path.dirname(inp.images_dir), kind)
      try:
        for lineno, result in _hash_list(inp, cache, kind, pool,
                                         window=4 * workers):
          bar.update(1)
          if result is None:
            missing += 1
            continue
          digest, value = result
          source.append(index)
          linenos.append(lineno)
          digests.append(digest[:16])
          values.append(value)
      finally:
        cache.close()
  bar.close()
  digest_arr = np.frombuffer(b"".join(digests), dtype=">u8").reshape(-1, 2) \
      if digests else np.zeros((0, 2), np.uint64)
  report = Report(
      inputs=resolved, source=np.asarray(source, np.int32),
      lineno=np.asarray(linenos, np.int64),
      digest=digest_arr.astype(np.uint64),
      perceptual=np.asarray([max(v, 0) for v in values], np.uint64),
      groups=[], hash_kind=kind, missing=missing)
  known = np.asarray([v >= 0 for v in values], bool)
  report.groups = _group(report, known, threshold if near else None)
  return report


def _hash_list(inp: Input, cache: _HashCache, kind: str | None, pool, *,
               window: int) -> Iterator[tuple[int, tuple[bytes, int] | None]]:
  """Yields (lineno, (digest, phash) or None if missing), in input order.

  A bounded window of hashing jobs runs in the pool; cached results skip it.
  """
  jobs: collections.deque = collections.deque()

  def drain(all_of_them: bool):
    while jobs and (all_of_them or len(jobs) >= window):
      lineno, name, stat, job = jobs.popleft()
      if isinstance(job, concurrent.futures.Future):
        result = job.result()
        cache.put(name, stat, *result)
      else:
        result = job
      yield lineno, result

  for item in image_list.ListReader(inp.list_path):
    path = os.path.join(inp.images_dir, item.key)
    try:
      stat = os.stat(path)
    except FileNotFoundError:
      jobs.append((item.lineno, item.key, None, None))
      continue
    cached = cache.get(item.key, stat)
    job = cached if cached is not None else pool.submit(hash_file, path, kind)
    jobs.append((item.lineno, item.key, stat, job))
    yield from drain(False)
  yield from drain(True)


def _group(report: Report, known: np.ndarray, threshold: int | None
           ) -> list[list[int]]:
  n = report.num_images
  uf = _UnionFind(n)
  if n:
    order = np.lexsort((report.digest[:, 1], report.digest[:, 0]))
    d = report.digest[order]
    same = np.r_[False, (d[1:] == d[:-1]).all(axis=1)]
    for pos in np.flatnonzero(same):
      uf.union(int(order[pos - 1]), int(order[pos]))
  if threshold is not None and known.any():
    idx = np.flatnonzero(known)
    distinct, first = np.unique(report.perceptual[idx], return_index=True)
    reps = idx[first]
    # Identical perceptual hashes are distance 0: join them directly.
    inverse = np.searchsorted(distinct, report.perceptual[idx])
    for i, r in zip(idx, reps[inverse]):
      uf.union(int(i), int(r))
    for a, b in near_pairs(distinct, threshold):
      uf.union(int(reps[a]), int(reps[b]))
  members = collections.defaultdict(list)
  for i in range(n):
    members[uf.find(i)].append(i)
  return sorted((m for m in members.values() if len(m) > 1),
                key=lambda m: m[0])


def _names(report: Report, wanted: Iterable[int]) -> dict[int, tuple[str, str]]:
  """(name, annotations) of the wanted image indices, by re-reading lists."""
  wanted = set(wanted)
  out = {}
  key_of = {(int(report.source[i]), int(report.lineno[i])): i for i in wanted}
  for index, inp in enumerate(report.inputs):
    for item in image_list.ListReader(inp.list_path):
      i = key_of.get((index, item.lineno))
      if i is not None:
        out[i] = (item.key, item.annotations)
  return out


def write_report(report: Report, path: str) -> None:
  """TSV: group, kind, kept, list, name, sha256 prefix, perceptual hash."""
  names = _names(report, (i for g in report.groups for i in g))
  with output_dir.atomic_text(os.fspath(path)) as f:
    f.write("group\tkind\tkept\tlist\tname\tsha256_prefix\tperceptual_hash\n")
    for gid, group in enumerate(report.groups):
      kind = "exact" if report.is_exact(group) else "near"
      for rank, i in enumerate(group):
        digest = "".join(f"{int(x):016x}" for x in report.digest[i])
        perceptual = (f"{int(report.perceptual[i]):016x}"
                      if report.hash_kind else "-")
        f.write(f"{gid}\t{kind}\t{int(rank == 0)}\t"
                f"{report.inputs[report.source[i]].list_path}\t"
                f"{names[i][0]}\t{digest}\t{perceptual}\n")


def _dropped_list_path(inp: Input, in_place: bool) -> str:
  """Where `drop_duplicates` writes an input's list without repeats."""
  stem, ext = os.path.splitext(inp.list_path)
  return inp.list_path if in_place else f"{stem}.dedup{ext or '.txt'}"


def check_outputs(inputs: Sequence[str], report_path: str, *,
                  drop: bool = False, in_place: bool = False) -> None:
  """Refuses (OverlapError) a report or a written list that would be, hold or
  sit inside an input's list or images, before any hashing; with
  `in_place`, each list may replace itself."""
  resolved = [resolve_input(p) for p in inputs]
  sources = {}
  for inp in resolved:
    sources[f"list {inp.list_path}"] = inp.list_path
    sources[f"images of {inp.list_path}"] = inp.images_dir
  fileio.check_disjoint(sources, {"--out": report_path})
  if drop:
    fileio.check_disjoint(sources, {
        f"de-duplicated list of {inp.list_path}": _dropped_list_path(
            inp, in_place) for inp in resolved}, in_place=in_place)


def merge_annotations(annotations: Sequence[str]) -> tuple[np.ndarray,
                                                            np.ndarray]:
  """Union of the classes, each with its highest confidence."""
  best: dict[int, float] = {}
  for text in annotations:
    _, idx, conf = annotations_lib.parse_line(f"x\t{text}")
    for i, c in zip(idx.tolist(), conf.tolist()):
      best[i] = max(best.get(i, -2.0), c)
  keys = sorted(best)
  return (np.asarray(keys, np.int32),
          np.asarray([best[k] for k in keys], np.float32))


def drop_duplicates(report: Report, *, in_place: bool = False) -> list[str]:
  """Writes each input's list without repeats; returns the written paths.

  The kept image (first in input order) gets the group's merged annotations;
  lines without repeats are copied untouched. Output: ``<list>.dedup.txt``,
  or with ``in_place`` the list itself (the original kept as ``.bak``), its
  edits recorded (`output_dir.record_edits`) so that rerunning the download
  or extraction that wrote the list keeps them.
  """
  grouped = [i for g in report.groups for i in g]
  info = _names(report, grouped)
  dropped = {(int(report.source[i]), int(report.lineno[i]))
             for g in report.groups for i in g[1:]}
  merged = {}
  for group in report.groups:
    keep = group[0]
    idx, conf = merge_annotations([info[i][1] for i in group])
    merged[(int(report.source[keep]), int(report.lineno[keep]))] = (
        annotations_lib.format_line(info[keep][0], idx, conf))
  written = []
  for index, inp in enumerate(report.inputs):
    out = _dropped_list_path(inp, in_place)
    if in_place:
      backup = f"{inp.list_path}.bak"
      shutil.copyfile(inp.list_path, f"{backup}.tmp")
      os.replace(f"{backup}.tmp", backup)
      output_dir.record_edits(
          inp.list_path,
          [info[i][0] for g in report.groups for i in g[1:]
           if report.source[i] == index],
          [line for (source, _), line in merged.items() if source == index])
    with output_dir.atomic_text(out) as f:
      for item in image_list.ListReader(backup if in_place else inp.list_path):
        key = (index, item.lineno)
        if key in dropped:
          continue
        if key in merged:
          f.write(merged[key] + "\n")
        else:
          f.write(f"{item.key}\t{item.annotations}\n"
                  if item.annotations else f"{item.key}\n")
    written.append(out)
  return written
