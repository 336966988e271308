"""Tests for mlimages_jax.data.annotations: parse_line, format_line."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from mlimages_jax.data import annotations
from mlimages_jax.data.annotations import LabelError

from label_helpers import as_dict


def test_parse_line_rules():
  key, idx, conf = annotations.parse_line(
      "a/b.JPEG 7:0.8\t3  7:0.9 2:-1 9:0.85\r\n")
  assert key == "a/b.JPEG"
  assert idx.dtype == np.int32 and conf.dtype == np.float32
  assert idx.tolist() == [2, 3, 7, 9]  # Sorted, 7 once.
  np.testing.assert_array_equal(conf, np.float32([-1, 1, 0.9, 0.85]))
  assert annotations.parse_line("k 5:-1 5:0.7")[2].tolist() == [np.float32(0.7)]
  assert annotations.parse_line("only_key")[1].size == 0


@pytest.mark.parametrize("line, message", [
    ("", "empty line"),
    ("   \t ", "empty line"),
    ("k 3:x", "bad annotation '3:x'"),
    ("k a:1", "bad annotation 'a:1'"),
    ("k 3:", "bad annotation '3:'"),
    ("k 3:0.5:1", "bad annotation"),
    ("k -2:1", "class index -2 out of range"),
    ("k 10:1", r"class index 10 out of range 0\.\.9"),
    ("k 3:1.5", r"confidence '1.5' of class 3 outside \[-1, 1\]"),
    ("k 3:-1.01", "outside"),
    ("k 3:nan", "outside"),
])
def test_parse_line_errors_name_file_and_line(line, message):
  with pytest.raises(LabelError, match=message) as info:
    annotations.parse_line(line, num_classes=10, source="list.txt", lineno=12)
  assert str(info.value).startswith("list.txt:12: ")


def test_format_line_round_trip():
  line = "k\t2:-1\t3:1\t7:0.9\t9:0.85\t11:0.001"
  assert annotations.format_line(*annotations.parse_line(line)) == line
  assert annotations.format_line("k", [4], [1.0]) == "k\t4:1"
  assert annotations.format_line("k", [], []) == "k"
  assert annotations.format_confidence(np.float32(0.1)) == "0.1"


def test_train_urls_tiny_round_trips(shared_dir: pathlib.Path):
  lines = (shared_dir / "train_urls_tiny.txt").read_text().splitlines()
  assert len(lines) == 100
  for line in lines:
    key, idx, conf = annotations.parse_line(line, num_classes=11166)
    again = annotations.parse_line(annotations.format_line(key, idx, conf))
    assert again[0] == key == line.split("\t")[0]
    np.testing.assert_array_equal(again[1], idx)
    np.testing.assert_array_equal(again[2], conf)
    # Same multiset of tokens, only reordered ascending ("1.0" -> "1").
    tokens = {annotations.parse_line(f"k {t}")[1][0]: float(t.split(":")[1])
              for t in line.split("\t")[1:]}
    assert as_dict(idx, conf) == pytest.approx(tokens)
