"""Release list sharding."""

from __future__ import annotations

import pytest

from mlimages_jax.acquire import image_list
from mlimages_jax.data import annotations


def test_shards_cover_the_list_without_overlap():
  for n_lines in (0, 1, 7, 100):
    for count in (1, 3, 8):
      covered = []
      for i in range(count):
        first, last = image_list.shard_range(n_lines, (i, count))
        covered.extend(range(first, last + 1))
      assert covered == list(range(1, n_lines + 1))
  assert image_list.parse_shard("2/5") == (2, 5)
  with pytest.raises(ValueError):
    image_list.parse_shard("5/5")


def test_list_reader_bom_crlf_and_bad_bytes(tmp_path):
  """A BOM was part of the first key (a URL no server knows)."""
  path = tmp_path / "list.txt"
  path.write_bytes(b"\xef\xbb\xbfhttp://a/1.jpg 1:0.5\r\nhttp://a/\xe92 3\r\n"
                   b"http://a/3.jpg 4\r\n")
  with pytest.raises(annotations.LabelError, match=rf"^{path}:2: not UTF-8: "
                     "byte 0xe9 at column 10"):
    list(image_list.ListReader(str(path)))
  reader = image_list.ListReader(str(path), skip_invalid=True)
  assert [(i.lineno, i.key, i.annotations) for i in reader] == [
      (1, "http://a/1.jpg", "1:0.5"), (3, "http://a/3.jpg", "4")]
  assert reader.invalid_lines == {2}
