"""Tests for mlimages_jax.data.openimages: Open Images tag remapping."""

from __future__ import annotations

import pytest

from mlimages_jax.data import openimages
from mlimages_jax.data.annotations import LabelError

from label_helpers import write_lines


def test_openimages_mapping_and_remap(tmp_path):
  mapping_path = tmp_path / "map.tsv"
  mapping_path.write_text("LabelName\tindex\n/m/dog\t2\n/m/puppy\t1\n"
                          "# merged synonym\n/m/doggy\t2\n")
  mapping = openimages.load_openimages_mapping(mapping_path, 7)
  assert mapping == {"/m/dog": 2, "/m/puppy": 1, "/m/doggy": 2}
  inp = tmp_path / "oi.txt"
  write_lines(inp, ["u1 /m/dog:0.8 /m/cat:1 /m/doggy:0.9",
                    "u2 /m/cat /m/car:0.5", "u3 /m/puppy"])
  out = tmp_path / "out.txt"
  summary = openimages.remap_openimages_file(inp, out, mapping)
  assert out.read_text() == "u1\t2:0.9\nu3\t1:1\n"
  assert (summary.rows_in, summary.rows_out, summary.rows_empty) == (3, 2, 1)
  assert (summary.tags_in, summary.tags_kept, summary.tags_dropped) == (6, 3, 3)
  assert summary.unmapped == {"/m/cat": 2, "/m/car": 1}
  openimages.remap_openimages_file(inp, out, mapping, keep_empty=True)
  assert out.read_text().splitlines()[1] == "u2"


def test_remap_openimages_csv_and_errors(tmp_path):
  mapping = {"/m/dog": 2, "/m/puppy": 1}
  csv = tmp_path / "labels.csv"
  csv.write_text("ImageID,Source,LabelName,Confidence\n"
                 "000a,verification,/m/dog,1\n000a,crowdsource,/m/puppy,0\n"
                 "000b,verification,/m/cat,1\n000c,machine,/m/puppy,0.7\n")
  out = tmp_path / "out.txt"
  summary = openimages.remap_openimages_file(csv, out, mapping)
  assert out.read_text() == "000a\t1:0\t2:1\n000c\t1:0.7\n"
  assert summary.unmapped == {"/m/cat": 1}
  bad = tmp_path / "bad.txt"
  write_lines(bad, ["u1 /m/dog:0.5", "u2 /m/dog:3"])
  with pytest.raises(LabelError, match=rf"^{bad}:2: confidence '3'"):
    openimages.remap_openimages_file(bad, tmp_path / "o2.txt", mapping)
  assert not (tmp_path / "o2.txt").exists()
  duplicate = tmp_path / "dup.tsv"
  duplicate.write_text("/m/dog 2\n/m/dog 3\n")
  with pytest.raises(LabelError, match=rf"^{duplicate}:2: /m/dog maps to 3"):
    openimages.load_openimages_mapping(duplicate, 7)


def test_bom_crlf_and_bad_bytes(tmp_path):
  """A BOM hid the CSV header (every row an error); bad bytes were a
  UnicodeDecodeError traceback without file or line."""
  csv = tmp_path / "labels.csv"
  csv.write_bytes(b"\xef\xbb\xbfImageID,Source,LabelName,Confidence\r\n"
                  b"000a,verification,/m/dog,1\r\n")
  out = tmp_path / "out.txt"
  openimages.remap_openimages_file(csv, out, {"/m/dog": 2})
  assert out.read_text() == "000a\t2:1\n"
  mapping = tmp_path / "map.tsv"
  mapping.write_bytes(b"\xef\xbb\xbf/m/dog\t2\r\n/m/c\xe4t\t3\r\n")
  with pytest.raises(LabelError, match=rf"^{mapping}:2: not UTF-8"):
    openimages.load_openimages_mapping(mapping, 7)
  csv.write_bytes(b"u1 /m/dog\nu\xff2 /m/dog\n")
  with pytest.raises(LabelError, match=rf"^{csv}:2: not UTF-8"):
    openimages.remap_openimages_file(csv, out, {"/m/dog": 2})
