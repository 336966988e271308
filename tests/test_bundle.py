"""Tests of mlimages_jax.export.bundle: refusals and atomic export dirs."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

import export_helpers as helpers
from mlimages_jax.checkpoints import store
from mlimages_jax.cli import main as cli_main


@pytest.mark.parametrize("export_format", ["pytorch", "savedmodel"])
def test_checkpoint_not_matching_its_metadata_is_refused(
    tmp_path, capsys, export_format):
  """Weights of a ResNet-14 under metadata that claims a ResNet-26."""
  depth, width, classes, size = helpers.NETWORKS["tiny"]
  _, variables = helpers.network("tiny")
  checkpoint = store.save_inference_checkpoint(
      tmp_path / "ckpt", variables, store.make_metadata(
          depth=26, num_classes=classes, width_multiplier=width,
          image_size=size, label_mode="multi", class_ids=list("abcdefg"),
          class_names=list("abcdefg")))
  code = cli_main(["export", "--checkpoint", str(checkpoint), "--format",
                   export_format, "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 1
  assert "the weights do not fit the network its metadata describes" in err
  assert "missing ['batch_stats']['stages_0_block_1']" in err
  assert str(checkpoint) in err
  assert not (tmp_path / "out").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # No temp left.


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
  """A run folder: a tiny checkpoint and a file of the user's."""
  run = tmp_path_factory.mktemp("run")
  helpers.save_checkpoint("tiny", run / "ckpt")
  (run / "notes.txt").write_text("mine")
  return run


def _tree(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("export_format", ["pytorch", "savedmodel"])
@pytest.mark.parametrize("out", ["ckpt", ".", "ckpt/export"])
def test_an_export_never_overwrites_its_checkpoint(run_dir, capsys,
                                                   export_format, out):
  """--out = the checkpoint, its run folder, or inside it: refused, even
  with --overwrite, and nothing in the run moves."""
  before = _tree(run_dir)
  code = cli_main(["export", "--checkpoint", str(run_dir / "ckpt"),
                   "--format", export_format, "--out", str(run_dir / out),
                   "--overwrite"])
  err = capsys.readouterr().err
  assert code == 1
  assert "the input --checkpoint" in err and "refusing" in err
  assert _tree(run_dir) == before


def test_overwrite_replaces_only_an_earlier_export(run_dir, tmp_path, capsys):
  """Not a folder of the user's; the export gets the user's umask."""
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "model.safetensors").write_text("someone else's")
  args = ["export", "--checkpoint", str(run_dir / "ckpt"), "--format",
          "pytorch", "--overwrite", "--out"]
  assert cli_main(args + [str(mine)]) == 1
  assert "not written by this command" in capsys.readouterr().err
  assert _tree(mine) == {"model.safetensors": b"someone else's"}

  old = os.umask(0o027)
  try:
    out = tmp_path / "export"
    assert cli_main(args + [str(out)]) == 0
    first = _tree(out)
    assert cli_main(args + [str(out)]) == 0  # An earlier export: replaced.
  finally:
    os.umask(old)
  assert _tree(out) == first
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]
  modes = {p.name: stat.S_IMODE(p.stat().st_mode)
           for p in [out, *out.iterdir()]}
  assert modes == {"export": 0o750, **{name: 0o640 for name in first}}
