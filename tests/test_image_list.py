"""Release list sharding."""

from __future__ import annotations

import pytest

from mlimages_jax.acquire import image_list


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
