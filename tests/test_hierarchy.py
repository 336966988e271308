"""Tests for mlimages_jax.data.hierarchy: validation, queries, CSR closure, URLs."""

from __future__ import annotations

import functools
import http.server
import pathlib
import threading
import time

import numpy as np
import pytest

from mlimages_jax.data.hierarchy import HEADER, Hierarchy, HierarchyError
from mlimages_jax.data.hierarchy import load, ragged_arange

HEADER_LINE = "\t".join(HEADER)


def tsv(rows: list[tuple]) -> list[str]:
  return [HEADER_LINE] + ["\t".join(str(c) for c in row) for row in rows]


# A forest with parents at larger indices than children (unsorted order).
#   5 root "thing" -> 0 "animal" -> {2 "dog", 3 "cat"}; 2 -> 1 "puppy"
#   4 root "matter" -> 6 "water"
FOREST = [
    (0, "n0", 5, "animal, beast"),
    (1, "n1", 2, "puppy"),
    (2, "n2", 0, "dog"),
    (3, "n3", 0, "cat"),
    (4, "n4", -1, "matter"),
    (5, "n5", -1, "thing"),
    (6, "n6", 4, "water"),
]


@pytest.fixture(name="forest")
def fixture_forest() -> Hierarchy:
  return Hierarchy.from_lines(tsv(FOREST), source="forest.txt")


def reference_ancestors(parents: np.ndarray, i: int) -> list[int]:
  chain = []
  while parents[i] >= 0:
    i = int(parents[i])
    chain.append(i)
  return chain


def random_forest(rng: np.random.Generator, n: int) -> np.ndarray:
  """Parents of a random forest whose indices are shuffled (any order)."""
  topo_parent = np.full(n, -1)
  for k in range(1, n):
    topo_parent[k] = rng.integers(0, k) if rng.random() > 0.05 else -1
  perm = rng.permutation(n)  # perm[k]: index of the k-th node in topo order.
  parents = np.full(n, -1)
  parents[perm] = np.where(topo_parent >= 0, perm[topo_parent], -1)
  return parents


def test_queries_on_unordered_forest(forest: Hierarchy):
  assert forest.num_classes == 7 and len(forest) == 7
  assert forest.parent(1) == 2 and forest.parent(5) == -1
  assert forest.ancestors(1).tolist() == [2, 0, 5]  # Nearest first.
  assert forest.ancestors(5).tolist() == []
  assert forest.children(0).tolist() == [2, 3]
  assert forest.children(1).tolist() == []
  assert forest.descendants(5).tolist() == [0, 1, 2, 3]
  assert forest.descendants(4).tolist() == [6]
  assert forest.depth.tolist() == [1, 3, 2, 2, 0, 0, 1]
  assert forest.roots().tolist() == [4, 5]
  assert forest.leaves().tolist() == [1, 3, 6]
  assert forest.index_of("n3") == 3
  with pytest.raises(KeyError, match="n99"):
    forest.index_of("n99")
  with pytest.raises(IndexError):
    forest.parent(7)
  assert forest.name_path(1) == [(1, "n1", "puppy"), (2, "n2", "dog"),
                                 (0, "n0", "animal, beast"),
                                 (5, "n5", "thing")]


def test_find_by_index_wnid_name_and_synonym(forest: Hierarchy):
  assert forest.find(3) == [3] and forest.find("3") == [3]
  assert forest.find(99) == []
  assert forest.find("n6") == [6]
  assert forest.find("Dog") == [2]
  assert forest.find("beast") == [0]  # One of the comma-separated synonyms.
  repeated = Hierarchy.from_arrays(["a", "b", "c"], ["x", "bank", "bank"],
                                   [-1, 0, 0])
  assert repeated.find("bank") == [1, 2]


def test_csr_closure_matches_per_row_reference():
  rng = np.random.default_rng(0)
  parents = random_forest(rng, 3000)
  tree = Hierarchy.from_arrays([f"n{i}" for i in range(3000)],
                               [f"c{i}" for i in range(3000)], parents)
  assert (parents > np.arange(3000)).any()  # Not topologically ordered.
  for i in range(3000):
    expected = reference_ancestors(parents, i)
    assert tree.ancestors(i).tolist() == expected
    assert tree.depth[i] == len(expected)
  assert tree.ancestor_indptr[-1] == len(tree.ancestor_indices)
  closure_ptr, closure_idx = tree.closure_csr
  for i in range(0, 3000, 3):
    assert closure_idx[closure_ptr[i]:closure_ptr[i + 1]].tolist() == sorted(
        [i] + reference_ancestors(parents, i))
  # descendants() is the inverse relation of ancestors().
  for i in rng.choice(3000, 50, replace=False).tolist():
    expected = [j for j in range(3000) if i in reference_ancestors(parents, j)]
    assert tree.descendants(i).tolist() == expected
  assert not tree.parents.flags.writeable


@pytest.mark.parametrize("rows, line, message", [
    (FOREST[:3] + [(3, "n3", 3, "cat")] + FOREST[4:], 5, "cycle"),
    ([(0, "a", 1, "x"), (1, "b", 2, "y"), (2, "c", 0, "z")], 2, "no root"),
    (FOREST[:1] + [(1, "n1", 0, "puppy"), (2, "n2", 3, "dog"),
                   (3, "n3", 2, "cat")] + FOREST[4:], 4, "cycle"),
    (FOREST[:2] + [(2, "n2", 17, "dog")] + FOREST[3:], 4, "parent index 17"),
    (FOREST[:3] + [(3, "n0", 0, "cat")] + FOREST[4:], 5,
     "category id 'n0' repeats line 2"),
    (FOREST[:3] + [(2, "n9", 0, "cat")] + FOREST[4:], 5,
     "category index 2 repeats line 4"),
    (FOREST[:3] + [(9, "n3", 0, "cat")] + FOREST[4:], 5, "out of range"),
    (FOREST[:3] + [("three", "n3", 0, "cat")] + FOREST[4:], 5,
     "must be integers"),
    (FOREST[:3] + [(3, "n3", 0)] + FOREST[4:], 5, "4 TAB-separated"),
    (FOREST[:3] + [(3, "n3", 0, "cat", "extra")] + FOREST[4:], 5,
     "got 5"),
    (FOREST[:3] + [(3, "", 0, "cat")] + FOREST[4:], 5, "empty category id"),
])
def test_bad_hierarchies_name_file_and_line(rows, line, message):
  with pytest.raises(HierarchyError, match=message) as info:
    Hierarchy.from_lines(tsv(rows), source="h.txt")
  assert str(info.value).startswith(f"h.txt:{line}: ")
  assert info.value.lineno == line


def test_missing_header_and_empty_file():
  with pytest.raises(HierarchyError, match=r"^h.txt:1: missing header"):
    Hierarchy.from_lines(tsv(FOREST)[1:], source="h.txt")
  with pytest.raises(HierarchyError, match=r"^h.txt:1: empty file"):
    Hierarchy.from_lines([], source="h.txt")
  with pytest.raises(HierarchyError, match=r"^h.txt:2: no categories"):
    Hierarchy.from_lines([HEADER_LINE], source="h.txt")


def test_from_arrays_validates():
  with pytest.raises(HierarchyError, match="cycle"):
    Hierarchy.from_arrays(["a", "b"], ["a", "b"], [1, 0])
  with pytest.raises(HierarchyError, match="differ in length"):
    Hierarchy.from_arrays(["a", "b"], ["a"], [-1, 0])
  with pytest.raises(HierarchyError, match=r"<arrays>:1: category id 'a'"):
    Hierarchy.from_arrays(["a", "a"], ["a", "b"], [-1, 0])


def test_write_round_trip_is_byte_exact(forest: Hierarchy,
                                        tmp_path: pathlib.Path):
  path = tmp_path / "h.txt"
  path.write_text("\n".join(tsv(sorted(FOREST))) + "\n")
  out = tmp_path / "out" / "h.txt"
  Hierarchy.from_file(path).write(out)
  assert out.read_bytes() == path.read_bytes()
  again = Hierarchy.from_file(out)
  assert again.wnids == forest.wnids and again.names == forest.names
  np.testing.assert_array_equal(again.parents, forest.parents)
  assert [p.name for p in out.parent.iterdir()] == ["h.txt"]  # No temp left.


def test_from_file_error_names_the_path(tmp_path: pathlib.Path):
  path = tmp_path / "broken.txt"
  path.write_text("\n".join(tsv(FOREST + [(7, "n7", 8, "x")])) + "\n")
  with pytest.raises(HierarchyError, match=rf"^{path}:9: parent index 8"):
    Hierarchy.from_file(path)


def test_stats(forest: Hierarchy):
  stats = forest.stats()
  assert stats["num_categories"] == 7
  assert stats["num_roots"] == 2 and stats["roots"] == ["matter", "thing"]
  assert stats["num_leaves"] == 3 and stats["max_depth"] == 3
  assert stats["mean_depth"] == pytest.approx(9 / 7)
  assert stats["depth_histogram"] == {"0": 2, "1": 2, "2": 2, "3": 1}


def test_ragged_arange():
  np.testing.assert_array_equal(
      ragged_arange(np.array([5, 0, 10, 3]), np.array([2, 0, 3, 1])),
      [5, 6, 10, 11, 12, 3])
  assert ragged_arange(np.array([1]), np.array([0])).size == 0


def test_real_hierarchy(real_hierarchy_path: pathlib.Path,
                        tmp_path: pathlib.Path):
  tree = Hierarchy.from_file(real_hierarchy_path)
  assert tree.num_classes == 11166
  assert [tree.names[r] for r in tree.roots()] == [
      "thing", "matter", "object, physical object", "atmospheric phenomenon"]
  assert len(set(tree.wnids)) == 11166 and len(set(tree.names)) < 11166
  assert (tree.parents > np.arange(11166)).any()  # Not in topological order.
  pet = tree.find("pet")
  assert pet == [tree.index_of("n01318894")]
  assert tree.children(pet[0]).size == 0  # The questionable leaf "pet".
  parents = tree.parents
  for i in range(0, 11166, 7):
    assert tree.ancestors(i).tolist() == reference_ancestors(parents, i)
  assert tree.depth.max() == 16
  out = tmp_path / "copy.txt"
  tree.write(out)
  assert out.read_bytes() == real_hierarchy_path.read_bytes()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):  # Keep the test output clean.
    pass


@pytest.fixture(name="http_root")
def fixture_http_root(tmp_path: pathlib.Path):
  """A real HTTP server on 127.0.0.1 serving `tmp_path / "www"`."""
  root = tmp_path / "www"
  root.mkdir()
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0),
      functools.partial(_QuietHandler, directory=str(root)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield root, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def test_from_url_downloads_validates_and_caches(http_root, tmp_path):
  root, base = http_root
  (root / "h.txt").write_text("\n".join(tsv(FOREST)) + "\n")
  cache = tmp_path / "cache" / "h.txt"
  tree = load(f"{base}/h.txt", cache_path=cache)
  assert tree.wnids == tuple(f"n{i}" for i in range(7))
  assert cache.read_text() == (root / "h.txt").read_text()
  (root / "h.txt").unlink()  # Served from the cache from now on.
  assert load(f"{base}/h.txt", cache_path=cache).wnids == tree.wnids

  (root / "bad.txt").write_text("\n".join(tsv(FOREST)[1:]) + "\n")
  bad_cache = tmp_path / "cache" / "bad.txt"
  with pytest.raises(HierarchyError, match=rf"^{base}/bad.txt:1: missing"):
    load(f"{base}/bad.txt", cache_path=bad_cache)
  assert not bad_cache.exists()  # A broken download never enters the cache.


def test_text_as_people_make_it(tmp_path: pathlib.Path):
  """A BOM (it broke the header) and CRLF are read; bad bytes and a huge
  parent (an OverflowError traceback) name the file and line."""
  path = tmp_path / "h.txt"
  path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(tsv(FOREST)).encode()
                   + b"\r\n")
  tree = Hierarchy.from_file(path)
  assert tree.wnids == tuple(f"n{i}" for i in range(7))
  assert tree.names[6] == "water"
  lines = tsv(FOREST)
  lines[2] = lines[2].replace("puppy", "pup\xffpy")
  path.write_bytes("\n".join(lines).encode("latin-1"))
  with pytest.raises(HierarchyError,
                     match=rf"^{path}:3: not UTF-8: byte 0xff at column 11"):
    Hierarchy.from_file(path)
  lines = tsv(FOREST)
  lines[2] = "1\tn1\t99999999999999999999\tpuppy"
  path.write_text("\n".join(lines))
  with pytest.raises(HierarchyError, match=rf"^{path}:3: parent index "
                     "99999999999999999999 of category 1 does not exist"):
    Hierarchy.from_file(path)


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
  """A valid hierarchy, one byte every 20 ms (each read is quick)."""

  def do_GET(self):  # pylint: disable=invalid-name
    body = ("\n".join(tsv(FOREST)) + "\n").encode()
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    try:
      for i in range(len(body)):
        self.wfile.write(body[i:i + 1])
        self.wfile.flush()
        time.sleep(0.02)
    except OSError:  # The client gave up.
      pass

  def log_message(self, *args):
    pass


def test_from_url_has_a_total_deadline_and_a_size_cap(http_root):
  """The per-read timeout never fired on a trickling body (it hung for as
  long as the server liked); now the whole download has a deadline."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}/h.txt"
    with pytest.raises(OSError, match=r"not complete after 0.5 s"):
      Hierarchy.from_url(url, deadline=0.5)
  finally:
    server.shutdown()
    server.server_close()
  root, base = http_root
  (root / "h.txt").write_text("\n".join(tsv(FOREST)) + "\n")
  with pytest.raises(OSError, match=r"h.txt: 1\d\d bytes, more than the 100"):
    Hierarchy.from_url(f"{base}/h.txt", max_bytes=100)
  (root / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(
      tsv(FOREST)).encode())
  assert Hierarchy.from_url(f"{base}/bom.txt").num_classes == 7
