"""The ML-Images semantic hierarchy: a forest of WordNet categories.

`dictionary_and_semantic_hierarchy.txt` is a TAB-separated table with a header
and the columns ``category_index  category_id  index_of_parent_category
category name``. Every category has one parent (``-1`` marks a root); parents
do not always have a smaller index than their children, so nothing here
assumes topological order. Names repeat, so wnids are the class keys.

Loading validates everything a training run silently depends on and names the
offending file and line. The ancestor closure is precomputed as CSR arrays so
that label augmentation closes millions of label sets with a few NumPy calls.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Iterable, Sequence

import numpy as np

from mlimages_jax import fileio
from mlimages_jax.fileio import PathLike, atomic_writer

HEADER = ("category_index", "category_id", "index_of_parent_category",
          "category name")
ORIGINAL_URL = ("https://raw.githubusercontent.com/Tencent/tencent-ml-images/"
                "master/data/dictionary_and_semantic_hierarchy.txt")



class HierarchyError(ValueError):
  """A malformed hierarchy; the message starts with ``<file>:<line>: ``."""

  def __init__(self, source: str, lineno: int, message: str):
    super().__init__(f"{source}:{lineno}: {message}")
    self.source = source
    self.lineno = lineno


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Concatenation of ``arange(s, s + n)`` for each (s, n), without a loop.

  int32 when the values fit: it halves the memory traffic of the label hot
  path, which gathers bytes and ancestors with these indices.
  """
  lengths = np.asarray(lengths, np.int64)
  starts = np.asarray(starts, np.int64)
  total = int(lengths.sum())
  if total == 0:
    return np.zeros(0, np.int64)
  small = total < 2**31 and int((starts + lengths).max()) < 2**31
  dtype = np.int32 if small else np.int64
  out_offsets = np.cumsum(lengths) - lengths
  return (np.repeat((starts - out_offsets).astype(dtype), lengths)
          + np.arange(total, dtype=dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class Hierarchy:
  """An immutable, validated category forest.

  Build it with `from_file`, `from_url`, `from_lines` or `from_arrays`; the
  constructor itself does not validate.
  """

  wnids: tuple[str, ...]
  names: tuple[str, ...]
  parents: np.ndarray  # int32 [N]; -1 for roots.
  source: str = "<arrays>"

  # ---- construction ---------------------------------------------------------

  @classmethod
  def from_arrays(cls, wnids: Sequence[str], names: Sequence[str],
                  parents: Sequence[int] | np.ndarray, *,
                  source: str = "<arrays>") -> Hierarchy:
    """Validates in-memory arrays; error "lines" are 0-based class indices."""
    wnids = tuple(str(w) for w in wnids)
    names = tuple(str(n) for n in names)
    parents = np.asarray(parents)
    if not (len(wnids) == len(names) == len(parents)):
      raise HierarchyError(source, 0, "wnids, names and parents differ in "
                           f"length ({len(wnids)}, {len(names)}, "
                           f"{len(parents)})")
    if parents.ndim != 1 or (parents.size and
                             not np.issubdtype(parents.dtype, np.integer)):
      raise HierarchyError(source, 0, "parents must be a 1-D integer array")
    return cls._validated(wnids, names, parents.astype(np.int32),
                          np.arange(len(wnids)), source)

  @classmethod
  def from_lines(cls, lines: Iterable[str], source: str = "<lines>"
                 ) -> Hierarchy:
    """Parses and validates the original TSV format (header line included)."""
    rows: dict[int, tuple[str, str, int, int]] = {}
    header_seen = False
    for lineno, line in enumerate(lines, start=1):
      line = line.rstrip("\r\n")
      if not header_seen:
        if tuple(c.strip() for c in line.split("\t")) != HEADER:
          raise HierarchyError(
              source, lineno, "missing header; expected the TAB-separated "
              f"columns {' | '.join(HEADER)!r}, got {line[:80]!r}")
        header_seen = True
        continue
      if not line.strip():
        continue
      columns = line.split("\t")
      if len(columns) != 4:
        raise HierarchyError(source, lineno, f"expected 4 TAB-separated "
                             f"columns, got {len(columns)}: {line[:80]!r}")
      index_s, wnid, parent_s, name = (c.strip() for c in columns)
      try:
        index, parent = int(index_s), int(parent_s)
      except ValueError:
        raise HierarchyError(source, lineno, "category index and parent index "
                             f"must be integers, got {index_s!r} and "
                             f"{parent_s!r}") from None
      if not wnid:
        raise HierarchyError(source, lineno, "empty category id")
      if index in rows:
        raise HierarchyError(source, lineno, f"category index {index} "
                             f"repeats line {rows[index][3]}")
      rows[index] = (wnid, name, parent, lineno)
    if not header_seen:
      raise HierarchyError(source, 1, "empty file (missing header)")
    if not rows:
      raise HierarchyError(source, 2, "no categories after the header")
    n = len(rows)
    for index, (_, _, parent, lineno) in rows.items():
      if not 0 <= index < n:
        raise HierarchyError(source, lineno, f"category index {index} out of "
                             f"range: {n} categories must be indexed "
                             f"0..{n - 1}")
      if not -1 <= parent < n:  # Before int32: a huge one would overflow.
        raise _bad_parent(source, lineno, parent, index, n)
    ordered = [rows[i] for i in range(n)]
    return cls._validated(
        tuple(r[0] for r in ordered), tuple(r[1] for r in ordered),
        np.array([r[2] for r in ordered], np.int32),
        np.array([r[3] for r in ordered]), source)

  @classmethod
  def from_file(cls, path: PathLike) -> Hierarchy:
    """Reads a local or remote file (BOM, CRLF and bad bytes: `fileio`)."""
    with fileio.open_text(path, HierarchyError) as lines:
      return cls.from_lines(lines, source=str(path))

  @classmethod
  def from_url(cls, url: str = ORIGINAL_URL, *,
               cache_path: PathLike | None = None,
               deadline: float = fileio.REMOTE_DEADLINE_S,
               max_bytes: int = 64 << 20) -> Hierarchy:
    """Downloads (or reads the cached copy of) a hierarchy file.

    The whole download must finish within `deadline` seconds and
    `max_bytes` (the original file is 0.6 MB): a slow or endless body fails
    with an OSError instead of hanging. The download is validated before it
    is cached, so a broken response never poisons the cache.
    """
    if cache_path is not None and os.path.exists(cache_path):
      return cls.from_file(cache_path)
    body = fileio.read_url(url, deadline=deadline, max_bytes=max_bytes)
    lines = list(fileio.decode_lines(io.BytesIO(body), url, HierarchyError))
    hierarchy = cls.from_lines(lines, source=url)
    if cache_path is not None:
      with atomic_writer(cache_path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return hierarchy

  @classmethod
  def _validated(cls, wnids: tuple[str, ...], names: tuple[str, ...],
                 parents: np.ndarray, linenos: np.ndarray,
                 source: str) -> Hierarchy:
    n = len(wnids)
    if n == 0:
      raise HierarchyError(source, 0, "no categories")
    first_line: dict[str, int] = {}
    for i, wnid in enumerate(wnids):
      if wnid in first_line:
        raise HierarchyError(source, int(linenos[i]), f"category id {wnid!r} "
                             f"repeats line {first_line[wnid]}")
      first_line[wnid] = int(linenos[i])
    bad = np.flatnonzero((parents < -1) | (parents >= n))
    if bad.size:
      i = int(bad[0])
      raise _bad_parent(source, int(linenos[i]), int(parents[i]), i, n)
    if not (parents == -1).any():
      raise HierarchyError(source, int(linenos.min()), "no root category "
                           "(a root has parent -1); the parents form cycles")
    in_cycle = _cycle_members(parents)
    if in_cycle.size:
      i = int(in_cycle[0])
      cycle, j = [i], int(parents[i])
      while j != i:
        cycle.append(j)
        j = int(parents[j])
      path = " -> ".join(f"{k} ({wnids[k]})" for k in cycle + [i])
      raise HierarchyError(source, int(linenos[i]), f"cycle in the parent "
                           f"links: {path}")
    parents = parents.copy()
    parents.setflags(write=False)
    return cls(wnids, names, parents, source)

  def write(self, path: PathLike) -> None:
    """Writes the original TSV format (with header), atomically."""
    with atomic_writer(path, "w", encoding="utf-8", newline="\n") as f:
      f.write("\t".join(HEADER) + "\n")
      for i, (wnid, parent, name) in enumerate(
          zip(self.wnids, self.parents.tolist(), self.names)):
        f.write(f"{i}\t{wnid}\t{parent}\t{name}\n")

  # ---- simple queries -------------------------------------------------------

  @property
  def num_classes(self) -> int:
    return len(self.wnids)

  def __len__(self) -> int:
    return self.num_classes

  def _check(self, i: int) -> int:
    i = int(i)
    if not 0 <= i < self.num_classes:
      raise IndexError(f"class index {i} out of range "
                       f"0..{self.num_classes - 1}")
    return i

  def parent(self, i: int) -> int:
    """The parent's index, -1 for a root."""
    return int(self.parents[self._check(i)])

  def children(self, i: int) -> np.ndarray:
    """Direct children, ascending index."""
    i = self._check(i)
    indptr, indices = self._children_csr
    return indices[indptr[i]:indptr[i + 1]]

  def ancestors(self, i: int) -> np.ndarray:
    """Ancestors nearest first (parent, grandparent, ..., root), without i."""
    i = self._check(i)
    return self.ancestor_indices[
        self.ancestor_indptr[i]:self.ancestor_indptr[i + 1]]

  def descendants(self, i: int) -> np.ndarray:
    """All descendants (not i itself), ascending index."""
    i = self._check(i)
    positions = np.flatnonzero(self.ancestor_indices == i)
    rows = np.searchsorted(self.ancestor_indptr, positions, side="right") - 1
    return rows.astype(np.int32)

  def roots(self) -> np.ndarray:
    return np.flatnonzero(self.parents == -1).astype(np.int32)

  def leaves(self) -> np.ndarray:
    indptr, _ = self._children_csr
    return np.flatnonzero(np.diff(indptr) == 0).astype(np.int32)

  def index_of(self, wnid: str) -> int:
    try:
      return self._wnid_index[wnid]
    except KeyError:
      raise KeyError(f"unknown category id {wnid!r} in {self.source}") from None

  def find(self, query: str | int) -> list[int]:
    """Class indices matching an index, a wnid, or a name.

    Names repeat, so every match is returned. A name matches the whole name
    or any of its comma-separated synonyms, case-insensitively ("object"
    finds "object, physical object").
    """
    if isinstance(query, (int, np.integer)) or str(query).strip().isdigit():
      i = int(query)
      return [i] if 0 <= i < self.num_classes else []
    query = str(query).strip()
    if query in self._wnid_index:
      return [self._wnid_index[query]]
    key = query.lower()
    exact, synonym = self._name_index
    return list(exact.get(key) or synonym.get(key) or [])

  def name_path(self, i: int) -> list[tuple[int, str, str]]:
    """(index, wnid, name) from i up to its root: what a user inspects."""
    chain = [self._check(i)] + self.ancestors(i).tolist()
    return [(k, self.wnids[k], self.names[k]) for k in chain]

  # ---- derived structures (computed once, on first use) ---------------------

  @functools.cached_property
  def _wnid_index(self) -> dict[str, int]:
    return {w: i for i, w in enumerate(self.wnids)}

  @functools.cached_property
  def _name_index(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    exact: dict[str, list[int]] = {}
    synonym: dict[str, list[int]] = {}
    for i, name in enumerate(self.names):
      exact.setdefault(name.lower(), []).append(i)
      for word in {w.strip().lower() for w in name.split(",")}:
        synonym.setdefault(word, []).append(i)
    return exact, synonym

  @functools.cached_property
  def _children_csr(self) -> tuple[np.ndarray, np.ndarray]:
    has_parent = np.flatnonzero(self.parents >= 0)
    order = has_parent[np.argsort(self.parents[has_parent], kind="stable")]
    counts = np.bincount(self.parents[has_parent], minlength=self.num_classes)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return _frozen(indptr), _frozen(order.astype(np.int32))

  @functools.cached_property
  def depth(self) -> np.ndarray:
    """Edges from each class to its root (int32; roots have depth 0)."""
    # Pointer jumping: log2(max depth) vectorised rounds.
    depth = (self.parents >= 0).astype(np.int32)
    jump = self.parents.astype(np.int64)
    while (jump >= 0).any():
      up = jump >= 0
      target = jump[up]
      depth[up] += depth[target]
      jump[up] = jump[target]
    return _frozen(depth)

  @functools.cached_property
  def _ancestor_csr(self) -> tuple[np.ndarray, np.ndarray]:
    depth = self.depth.astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(depth)])
    indices = np.empty(int(indptr[-1]), np.int32)
    current = self.parents.astype(np.int64)
    rows = np.flatnonzero(current >= 0)
    step = 0
    while rows.size:  # One vectorised round per level of the deepest chain.
      indices[indptr[rows] + step] = current[rows]
      current[rows] = self.parents[current[rows]]
      rows = rows[current[rows] >= 0]
      step += 1
    return _frozen(indptr), _frozen(indices)

  @property
  def ancestor_indptr(self) -> np.ndarray:
    """CSR row pointers (int64 [N + 1]) into `ancestor_indices`."""
    return self._ancestor_csr[0]

  @property
  def ancestor_indices(self) -> np.ndarray:
    """Ancestors of every class, nearest first, concatenated (int32)."""
    return self._ancestor_csr[1]

  @functools.cached_property
  def closure_csr(self) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices): each class with its ancestors, ascending index.

    A label set with one positive class closes to exactly this row, which
    lets label augmentation copy it instead of sorting.
    """
    indptr = self.ancestor_indptr + np.arange(self.num_classes + 1)
    own = np.arange(self.num_classes, dtype=np.int64)
    chains = np.concatenate([own, self.ancestor_indices])
    chain_rows = np.concatenate([own, np.repeat(
        own, np.diff(self.ancestor_indptr))])
    indices = chains[np.lexsort((chains, chain_rows))]
    return _frozen(indptr), _frozen(indices.astype(np.int32))

  def to_json_metadata(self) -> dict[str, list]:
    """The dict the TFDS builder stores in `info.metadata`."""
    return {"wnids": list(self.wnids), "names": list(self.names),
            "parents": self.parents.tolist()}

  def stats(self) -> dict[str, object]:
    """Summary numbers for `mlimages hierarchy stats`."""
    depth = self.depth
    roots = self.roots()
    histogram = np.bincount(depth)
    return {
        "source": self.source,
        "num_categories": self.num_classes,
        "num_roots": int(roots.size),
        "roots": [self.names[r] for r in roots],
        "root_wnids": [self.wnids[r] for r in roots],
        "num_leaves": int(self.leaves().size),
        "max_depth": int(depth.max()),
        "mean_depth": float(depth.mean()),
        "depth_histogram": {str(d): int(c) for d, c in enumerate(histogram)},
        "num_repeated_names": self.num_classes - len(set(self.names)),
        "max_children": int(np.diff(self._children_csr[0]).max()),
    }


def load(source: PathLike, *, cache_path: PathLike | None = None
         ) -> Hierarchy:
  """A hierarchy from a local path or an http(s) URL (e.g. `ORIGINAL_URL`)."""
  if str(source).startswith(("http://", "https://")):
    return Hierarchy.from_url(str(source), cache_path=cache_path)
  return Hierarchy.from_file(source)


def _bad_parent(source: str, lineno: int, parent: int, index: int, n: int
                ) -> HierarchyError:
  return HierarchyError(source, lineno, f"parent index {parent} of category "
                        f"{index} does not exist (valid: -1 for a root, or "
                        f"0..{n - 1})")


def _cycle_members(parents: np.ndarray) -> np.ndarray:
  """Indices whose parent chain never reaches a root (sorted)."""
  # After k rounds of pointer doubling, jump[i] is the 2^k-th ancestor; every
  # chain that ends in a root has length < n, so ceil(log2(n)) + 1 rounds
  # leave only nodes on, or leading into, a cycle.
  jump = parents.astype(np.int64)
  for _ in range(max(1, int(np.ceil(np.log2(max(len(parents), 2))))) + 1):
    up = jump >= 0
    jump[up] = jump[jump[up]]
  stuck = np.flatnonzero(jump >= 0)
  if not stuck.size:
    return stuck
  # Walk from the first stuck node until a node repeats: it is on a cycle.
  seen, i = set(), int(stuck[0])
  while i not in seen:
    seen.add(i)
    i = int(parents[i])
  return np.array([i])


def _frozen(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)
  return array
