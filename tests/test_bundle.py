"""Tests of mlimages_jax.export.bundle: refusals and atomic export dirs."""

from __future__ import annotations

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
