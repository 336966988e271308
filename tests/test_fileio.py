"""Tests for mlimages_jax.fileio: results appear complete or not at all."""

from __future__ import annotations

import pytest

from mlimages_jax import fileio


def test_atomic_writer_replaces_only_on_success(tmp_path):
  target = tmp_path / "sub" / "out.txt"
  with fileio.atomic_writer(target) as f:
    f.write("first\n")
    assert not target.exists()  # Invisible until the writer closes.
  assert target.read_text() == "first\n"

  with pytest.raises(RuntimeError):
    with fileio.atomic_writer(target) as f:
      f.write("half-written")
      raise RuntimeError("killed")
  assert target.read_text() == "first\n"
  assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_writer_binary_mode(tmp_path):
  target = tmp_path / "out.bin"
  with fileio.atomic_writer(target, "wb") as f:
    f.write(b"\x00\xff")
  assert target.read_bytes() == b"\x00\xff"
