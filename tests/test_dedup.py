"""Duplicate finding: exact and perceptual hashes, grouping, --drop merging."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mlimages_jax import decoding
from mlimages_jax.acquire import dedup
from mlimages_jax.acquire import errors
from mlimages_jax.acquire import output_dir

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _photo(seed: int, size=(96, 64)) -> Image.Image:
  """A smooth random image (low frequencies dominate, like photos)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 255, (4, 6, 3), np.uint8)
  return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _encode(img: Image.Image, fmt="JPEG", **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _write_dir(root: pathlib.Path, entries: list[tuple[str, bytes, str]]):
  (root / "images").mkdir(parents=True)
  for name, body, _ in entries:
    (root / "images" / name).write_bytes(body)
  (root / "im_list.txt").write_text(
      "".join(f"{name}\t{ann}\n" for name, _, ann in entries))


def _reference_phash(img: Image.Image) -> int:
  """pHash straight from the definition with an explicit DCT-II sum."""
  pixels = np.asarray(img.convert("L").resize((32, 32),
                                              Image.Resampling.LANCZOS),
                      np.float64)
  n = 32
  coeffs = np.zeros((8, 8))
  for u in range(8):
    for v in range(8):
      cu = np.sqrt(1 / n) if u == 0 else np.sqrt(2 / n)
      cv = np.sqrt(1 / n) if v == 0 else np.sqrt(2 / n)
      basis = np.outer(np.cos(np.pi * (2 * np.arange(n) + 1) * u / (2 * n)),
                       np.cos(np.pi * (2 * np.arange(n) + 1) * v / (2 * n)))
      coeffs[u, v] = cu * cv * (pixels * basis).sum()
  bits = coeffs.ravel() > np.median(coeffs.ravel()[1:])
  return int("".join("1" if b else "0" for b in bits), 2)


def test_perceptual_hashes_match_definitions():
  img = _photo(3)
  png = Image.open(io.BytesIO(_encode(img, "PNG")))
  assert dedup.phash(png) == _reference_phash(img)
  grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS),
                    np.float64)
  bits = (grey[:, 1:] > grey[:, :-1]).ravel()
  assert dedup.dhash(Image.open(io.BytesIO(_encode(img, "PNG")))) == int(
      "".join("1" if b else "0" for b in bits), 2)
  # Re-encoding and resizing move the hash a little; another photo a lot.
  a = dedup.phash(img)
  b = dedup.phash(Image.open(io.BytesIO(
      _encode(img.resize((80, 53)), quality=60))))
  c = dedup.phash(_photo(4))
  assert dedup.hamming(a, b) <= 8 < dedup.hamming(a, c)


def test_hash_file_applies_the_decode_policy(tmp_path, monkeypatch):
  """16-bit greyscale hashes as its `>> 8` twin (PIL alone clips it to a
  white, featureless image); too many pixels are never decoded."""
  deep = (np.asarray(_photo(5).convert("L"), np.uint16) * 257
          + np.uint16(200))
  (tmp_path / "deep.png").write_bytes(_encode(Image.fromarray(deep), "PNG"))
  (tmp_path / "shallow.png").write_bytes(
      _encode(Image.fromarray((deep >> 8).astype(np.uint8)), "PNG"))
  for kind in ("phash", "dhash"):
    _, value = dedup.hash_file(str(tmp_path / "deep.png"), kind)
    assert value == dedup.hash_file(str(tmp_path / "shallow.png"), kind)[1]
  monkeypatch.setattr(decoding, "MAX_PIXELS", 96 * 63)
  monkeypatch.setattr(dedup, "phash", None)  # Must not be reached.
  digest, value = dedup.hash_file(str(tmp_path / "deep.png"), "phash")
  assert value == -1 and len(digest) == 32


def test_near_pairs_equals_brute_force():
  rng = np.random.default_rng(0)
  base = rng.integers(0, 2 ** 63, 60, dtype=np.int64).astype(np.uint64)
  flips = [np.uint64(1 << int(k)) for k in rng.integers(0, 64, 200)]
  values = list(base)
  for i in range(120):  # Variants 1..5 bits away from a base value.
    v = base[i % 60]
    for k in range(1 + i % 5):
      v = v ^ flips[(i * 7 + k) % 200]
    values.append(v)
  values = np.unique(np.asarray(values, np.uint64))
  for t in (0, 2, 4, 7):
    got = sorted(dedup.near_pairs(values, t))
    n = len(values)
    want = [(i, j) for i in range(n) for j in range(i + 1, n)
            if dedup.hamming(int(values[i]), int(values[j])) <= t]
    assert got == want


def test_groups_report_and_drop(tmp_path):
  a, b, c = _photo(1), _photo(2), _photo(5)
  a_jpeg = _encode(a, quality=90)
  part1 = [("a.jpg", a_jpeg, "1:1\t7:0.8"),
           ("b.jpg", _encode(b), "2:1"),
           ("a_copy.jpg", a_jpeg, "3:0.9\t7:0.9"),
           ("broken.jpg", b"not an image", "4:1")]
  part2 = [("a_small.jpg", _encode(a.resize((64, 43)), quality=70), "5:1"),
           ("c.jpg", _encode(c), "6:1"),
           ("a_again.jpg", a_jpeg, "7:1\t1:0.5"),
           ("gone.jpg", b"", "8:1")]
  _write_dir(tmp_path / "p1", part1)
  _write_dir(tmp_path / "p2", part2)
  (tmp_path / "p2" / "images" / "gone.jpg").unlink()

  exact = dedup.find_duplicates([tmp_path / "p1", tmp_path / "p2" /
                                 "im_list.txt"], progress=False)
  assert exact.num_images == 7 and exact.missing == 1
  # Images in input order: p1 a,b,a_copy,broken; p2 a_small,c,a_again.
  assert exact.groups == [[0, 2, 6]]
  assert exact.num_exact_groups == 1 and exact.num_redundant == 2

  near = dedup.find_duplicates([tmp_path / "p1", tmp_path / "p2"],
                               near=True, progress=False)
  assert near.groups == [[0, 2, 4, 6]]
  assert near.num_exact_groups == 0
  report = tmp_path / "dups.tsv"
  dedup.write_report(near, report)
  rows = [r.split("\t") for r in report.read_text().splitlines()[1:]]
  assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
      ("0", "near", "1", "a.jpg"), ("0", "near", "0", "a_copy.jpg"),
      ("0", "near", "0", "a_small.jpg"), ("0", "near", "0", "a_again.jpg")]

  written = dedup.drop_duplicates(near)
  assert written == [str(tmp_path / "p1" / "im_list.dedup.txt"),
                     str(tmp_path / "p2" / "im_list.dedup.txt")]
  # Union of the group's classes, each with its highest confidence.
  assert (tmp_path / "p1" / "im_list.dedup.txt").read_text().splitlines() == [
      "a.jpg\t1:1\t3:0.9\t5:1\t7:1", "b.jpg\t2:1", "broken.jpg\t4:1"]
  assert (tmp_path / "p2" / "im_list.dedup.txt").read_text().splitlines() == [
      "c.jpg\t6:1", "gone.jpg\t8:1"]


def test_cache_resumes_without_rehashing(tmp_path):
  _write_dir(tmp_path / "d", [(f"{i}.jpg", _encode(_photo(i)), f"{i}:1")
                              for i in range(6)])
  first = dedup.find_duplicates([tmp_path / "d"], near=True, progress=False)
  cache = tmp_path / "d" / dedup.CACHE_NAME
  assert len(cache.read_text().splitlines()) == 6
  # A modified file is re-hashed (one new cache line); the rest is cached.
  (tmp_path / "d" / "images" / "3.jpg").write_bytes(_encode(_photo(1)))
  second = dedup.find_duplicates([tmp_path / "d"], near=True, progress=False)
  lines = cache.read_text().splitlines()
  assert len(lines) == 7 and lines[-1].startswith("3.jpg\t")
  assert first.groups == [] and second.groups == [[1, 3]]
  # A torn last line (killed mid-write) is ignored.
  cache.write_text(cache.read_text() + "4.jpg\t12")
  third = dedup.find_duplicates([tmp_path / "d"], near=True, progress=False)
  assert third.groups == [[1, 3]]


def test_cli_dedup_in_place(tmp_path):
  img = _encode(_photo(9))
  _write_dir(tmp_path / "d", [("x.jpg", img, "1:0.5"), ("y.jpg", img, "1:1"),
                              ("z.jpg", _encode(_photo(8)), "2:1")])
  original = (tmp_path / "d" / "im_list.txt").read_text()
  out = tmp_path / "dups.tsv"
  result = subprocess.run(
      [sys.executable, "-m", "mlimages_jax", "dedup", str(tmp_path / "d"),
       "--out", str(out), "--drop", "--in-place", "--no-progress"],
      env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
      text=True)
  assert result.returncode == 0, result.stderr
  assert "3 images, 1 duplicate groups (1 exact, 0 near), 1 redundant" in (
      result.stdout)
  assert (tmp_path / "d" / "im_list.txt").read_text() == (
      "x.jpg\t1:1\nz.jpg\t2:1\n")
  assert (tmp_path / "d" / "im_list.txt.bak").read_text() == original
  assert len(out.read_text().splitlines()) == 3
  # Recorded for a rerun of the download that wrote the list.
  assert output_dir.read_edits(str(tmp_path / "d" / "im_list.txt")) == {
      "y.jpg": None, "x.jpg": "x.jpg\t1:1"}


@pytest.mark.parametrize("argv", [
    ["{d}", "--out", "{d}/im_list.txt"],
    ["{d}", "--out", "{d}/images/dups.tsv"],
    ["{d}/im_list.txt", "{d}/im_list.dedup.txt", "--drop"]])
def test_outputs_never_overwrite_inputs(tmp_path, capsys, argv):
  """The report or a de-duplicated list over an input list or its images:
  refused before hashing, with one line."""
  from mlimages_jax.cli import main  # pylint: disable=g-import-not-at-top
  img = _encode(_photo(9))
  _write_dir(tmp_path / "d", [("x.jpg", img, "1"), ("y.jpg", img, "2")])
  (tmp_path / "d" / "im_list.dedup.txt").write_text("y.jpg\t2\n")
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  code = main(["dedup", *[a.format(d=tmp_path / "d") for a in argv],
               "--no-progress"])
  err = capsys.readouterr().err
  assert code == 1
  assert "refusing to write over an input" in err and err.count("\n") == 1
  assert {p: p.read_bytes() for p in tmp_path.rglob("*")
          if p.is_file()} == before


def test_missing_inputs(tmp_path):
  with pytest.raises(errors.AcquireError, match="no im_list.txt"):
    dedup.find_duplicates([tmp_path], progress=False)
