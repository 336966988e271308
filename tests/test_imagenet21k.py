"""ImageNet-21k extraction from generated trees and tars (all three layouts)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from mlimages_jax.acquire import errors
from mlimages_jax.acquire import imagenet21k
from mlimages_jax.acquire import journal as journal_lib
from mlimages_jax.acquire import output_dir

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WNIDS = ("n01440764", "n02084071", "n09999999")


def _jpeg(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8)).save(
      buf, "JPEG")
  return buf.getvalue()


@pytest.fixture
def imagenet(tmp_path):
  """Images of the first two synsets; the third synset is absent entirely."""
  images = {f"{w}/{w}_{n}.JPEG": _jpeg(100 * i + n)
            for i, w in enumerate(WNIDS[:2]) for n in range(1, 6)}
  ids = [f"{WNIDS[0]}/{WNIDS[0]}_3.JPEG", f"{WNIDS[1]}/{WNIDS[1]}_1.JPEG",
         f"{WNIDS[0]}/{WNIDS[0]}_99.JPEG",  # Removed from this copy.
         f"{WNIDS[0]}/{WNIDS[0]}_1.JPEG", f"{WNIDS[2]}/{WNIDS[2]}_7.JPEG",
         f"{WNIDS[1]}/{WNIDS[1]}_5.JPEG"]
  id_list = tmp_path / "ids.txt"
  id_list.write_text("".join(f"{key}\t{i}:1\t{i + 10}:0.8\n"
                             for i, key in enumerate(ids)))
  root = tmp_path / "copies"
  tree = root / "tree"
  for key, body in images.items():
    (tree / key).parent.mkdir(parents=True, exist_ok=True)
    (tree / key).write_bytes(body)
  tars = root / "tars"
  tars.mkdir(parents=True)
  for w in WNIDS[:2]:
    _tar_of(tars / f"{w}.tar", {k.split("/")[1]: b for k, b in images.items()
                                if k.startswith(w)})
  release = root / "fall11_whole.tar"
  with tarfile.open(release, "w") as tar:
    for w in WNIDS[:2]:
      tar.add(tars / f"{w}.tar", arcname=f"{w}.tar")
  release_gz = root / "winter21_whole.tar.gz"
  with tarfile.open(release_gz, "w:gz") as tar:
    for w in WNIDS[:2]:
      tar.add(tars / f"{w}.tar", arcname=f"winter21_whole/{w}.tar")
  flat = root / "flat_release.tar"  # <wnid>/<file> members directly.
  _tar_of(flat, images)
  return dict(images=images, ids=ids, id_list=id_list,
              layouts={"tree": tree, "tars": tars, "release_tar": release,
                       "release_tar_gz": release_gz, "flat_tar": flat})


def _tar_of(path: pathlib.Path, members: dict[str, bytes]) -> None:
  with tarfile.open(path, "w") as tar:
    for name, body in sorted(members.items()):
      info = tarfile.TarInfo(name)
      info.size = len(body)
      tar.addfile(info, io.BytesIO(body))


def _check_output(out: pathlib.Path, imagenet: dict) -> None:
  ids = imagenet["ids"]
  present = [i for i, key in enumerate(ids) if key in imagenet["images"]]
  lines = (out / "im_list.txt").read_text().splitlines()
  assert lines == [f"{ids[i].split('/')[1]}\t{i}:1\t{i + 10}:0.8"
                   for i in present]
  assert sorted(os.listdir(out / "images")) == sorted(
      ids[i].split("/")[1] for i in present)
  for i in present:
    assert (out / "images" / ids[i].split("/")[1]).read_bytes() == (
        imagenet["images"][ids[i]])
  assert (out / "missing.txt").read_text().splitlines() == [ids[2], ids[4]]
  stats = json.loads((out / "stats.json").read_text())
  assert stats["ok"] == 4 and stats["missing"] == 2 and stats["pending"] == 0
  assert not os.listdir(out / output_dir.PARTIAL_DIR)


@pytest.mark.parametrize("layout", ["tree", "tars", "release_tar",
                                    "release_tar_gz", "flat_tar"])
def test_extract_every_layout(imagenet, tmp_path, layout):
  path = imagenet["layouts"][layout]
  expected = {"tree": "tree", "tars": "tars"}.get(layout, "release_tar")
  assert imagenet21k.detect_layout(str(path)) == expected
  out = tmp_path / f"out_{layout}"
  stats = imagenet21k.extract(imagenet["id_list"], path, out, progress=False)
  assert stats["last_run"]["layout"] == expected
  _check_output(out, imagenet)


def test_resume_skips_finished_and_adopts_unjournaled(imagenet, tmp_path):
  out = tmp_path / "out"
  path = imagenet["layouts"]["tars"]
  imagenet21k.extract(imagenet["id_list"], path, out, progress=False)
  journal = out / journal_lib.JOURNAL_NAME
  lines = journal.read_text().splitlines(keepends=True)
  records = [journal_lib.Record.from_line(line) for line in lines[1:]]
  kept = records[:2]
  adopted = next(r for r in records[2:] if r.ok)
  # As if killed: two records journaled, one image renamed into place but
  # not journaled, and a torn half-written record at the end.
  journal.write_text(lines[0] + "".join(r.to_line() for r in kept)
                     + adopted.to_line()[:7])
  keep_names = {r.name for r in kept if r.ok} | {adopted.name}
  for name in os.listdir(out / "images"):
    if name not in keep_names:
      os.unlink(out / "images" / name)
  inodes = {n: os.stat(out / "images" / n).st_ino for n in keep_names}
  (out / "im_list.txt").unlink()

  stats = imagenet21k.extract(imagenet["id_list"], path, out, progress=False)
  _check_output(out, imagenet)
  # Finished files were not rewritten; the unjournaled one was adopted.
  assert {n: os.stat(out / "images" / n).st_ino for n in keep_names} == inodes
  assert stats["last_run"]["adopted"] == 1
  assert stats["last_run"].get("ok", 0) == 4 - sum(r.ok for r in kept) - 1


def test_cli_extract_and_errors(imagenet, tmp_path):
  out = tmp_path / "cli_out"
  cmd = [sys.executable, "-m", "mlimages_jax", "imagenet21k", "extract",
         str(imagenet["id_list"]), "--imagenet",
         str(imagenet["layouts"]["release_tar"]), "--out", str(out),
         "--no-progress"]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(cmd, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert "2 IDs are not in" in result.stdout
  _check_output(out, imagenet)
  bad = tmp_path / "bad.txt"
  bad.write_text(f"{WNIDS[0]}/{WNIDS[0]}_1.JPEG 1:7\n")
  cmd[5] = str(bad)
  result = subprocess.run(cmd[:-3] + ["--out", str(tmp_path / "o2")],
                          env=env, capture_output=True, text=True)
  assert result.returncode == 1 and f"{bad}:1:" in result.stderr


def test_not_a_tar(tmp_path):
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"x" * 1000)
  with pytest.raises(errors.AcquireError, match="not a tar"):
    imagenet21k.detect_layout(str(junk))
  with pytest.raises(errors.AcquireError, match="no such"):
    imagenet21k.detect_layout(str(tmp_path / "nope"))
