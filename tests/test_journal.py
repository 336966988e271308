"""The journal: round trip, torn records, a foreign header."""

from __future__ import annotations

import pytest

from mlimages_jax.acquire import errors
from mlimages_jax.acquire import journal as journal_lib


def test_journal_roundtrip_torn_and_foreign(tmp_path):
  path = str(tmp_path / "journal")
  records = [journal_lib.Record(3, True, 2, name="a_b.jpg", stored_bytes=10,
                                original_bytes=20, width=4, height=3,
                                original_width=8, original_height=6),
             journal_lib.Record(5, False, 4, reason="timeout",
                                detail="x\ty\nz")]
  journal = journal_lib.Journal(path, {"list": 1})
  for r in records:
    journal.append(r)
  journal.close()
  with open(path, "a") as f:  # A garbled record, then a torn one.
    f.write("7\tok\t1\tna8\tok\n" + records[0].to_line()[:9])
  replayed = journal_lib.Journal(path, {"list": 1})
  replayed.close()
  assert replayed.records == {3: records[0], 5: journal_lib.Record(
      5, False, 4, reason="timeout", detail="x y z")}
  assert replayed.torn == 2
  assert open(path).read().endswith("\tok\n")  # The torn tail was cut.
  with pytest.raises(errors.AcquireError, match="other arguments"):
    journal_lib.Journal(path, {"list": 2})
