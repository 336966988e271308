"""Tests for mlimages_jax.data.annotation_reader: streaming files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from mlimages_jax.data import annotation_reader
from mlimages_jax.data import annotations
from mlimages_jax.data.annotations import LabelError

from label_helpers import TRICKY_LINES
from label_helpers import as_dict
from label_helpers import random_rows
from label_helpers import reference_close
from label_helpers import write_lines


@pytest.mark.parametrize("chunk_bytes", [1 << 17, 16, 7])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_reader_matches_parse_line(tmp_path, chunk_bytes, newline):
  path = tmp_path / "list.txt"
  write_lines(path, TRICKY_LINES, newline)
  reader = annotation_reader.AnnotationReader(path, num_classes=7,
                                              chunk_bytes=chunk_bytes)
  rows = list(reader)
  expected = [(n + 1, annotations.parse_line(line, num_classes=7))
              for n, line in enumerate(TRICKY_LINES) if line]
  assert len(rows) == len(expected) == reader.num_rows
  for (key, idx, conf), (_, (ekey, eidx, econf)) in zip(rows, expected):
    assert key == ekey
    np.testing.assert_array_equal(idx, eidx)
    np.testing.assert_array_equal(conf, econf)
  linenos = np.concatenate([
      b.linenos for b in annotation_reader.AnnotationReader(
          path, num_classes=7, chunk_bytes=chunk_bytes).batches()])
  assert linenos.tolist() == [n for n, _ in expected]


def test_reader_random_rows_and_gzip(tmp_path):
  rng = np.random.default_rng(1)
  rows = random_rows(rng, 3000, 50)
  lines = [annotations.format_line(k, i, c) for k, i, c in rows]
  path = tmp_path / "list.txt.gz"
  with gzip.open(path, "wt") as f:
    f.write("\n".join(lines))  # No final newline.
  got = list(annotation_reader.read_annotation_file(path, num_classes=50))
  assert len(got) == 3000
  for (key, idx, conf), (ekey, eidx, econf) in zip(got, rows):
    assert key == ekey
    assert as_dict(idx, conf) == reference_close([-1] * 50, eidx.tolist(),
                                                  econf.tolist())


def test_reader_errors_and_skip_invalid(tmp_path):
  path = tmp_path / "list.txt"
  write_lines(path, ["a 1:1", "b 2:0.5", "", "c 9:1", "d 1:2.0", "e x", "f 3"])
  with pytest.raises(LabelError, match=rf"^{path}:4: class index 9"):
    list(annotation_reader.read_annotation_file(path, num_classes=7))
  reader = annotation_reader.read_annotation_file(path, num_classes=7,
                                                  skip_invalid=True)
  assert [key for key, _, _ in reader] == ["a", "b", "f"]
  assert reader.num_invalid == 3
  assert [m.split(": ")[0] for m in reader.invalid_examples] == [
      f"{path}:4", f"{path}:5", f"{path}:6"]
  # Without num_classes any non-negative index is accepted.
  assert len(list(annotation_reader.read_annotation_file(
      path, skip_invalid=True))) == 4


@pytest.mark.parametrize("chunk_bytes", [1 << 17, 7])
def test_bom_crlf_and_bad_bytes(tmp_path, chunk_bytes):
  """A BOM became part of the first key; bytes that are not UTF-8 passed
  through as surrogates: now file:line, or skipped and counted."""
  path = tmp_path / "list.txt"
  path.write_bytes(b"\xef\xbb\xbfa 1:0.5\r\nb\xff 2\r\nc 3\r\n")
  read = lambda **kw: annotation_reader.AnnotationReader(  # noqa: E731
      path, chunk_bytes=chunk_bytes, **kw)
  with pytest.raises(LabelError, match=rf"^{path}:2: not UTF-8: byte 0xff "
                     "at column 2"):
    list(read())
  reader = read(skip_invalid=True)
  assert [key for key, _, _ in reader] == ["a", "c"]
  assert reader.num_invalid == 1
  path.write_bytes(b"\xef\xbb\xbfa 1:0.5\r\nb 2\r\n")
  assert [(key, idx.tolist()) for key, idx, _ in read()] == [
      ("a", [1]), ("b", [2])]
