"""Claiming an output folder, seen from the download command."""

from __future__ import annotations

import pytest

from mlimages_jax.acquire import download as dl
from mlimages_jax.acquire import errors
from mlimages_jax.acquire import journal as journal_lib
from mlimages_jax.acquire import output_dir

from acquire_helpers import fast_config


def test_unwritable_output_folder(tmp_path):
  lst = tmp_path / "urls.txt"
  lst.write_text("http://127.0.0.1:9/x.jpg 1\n")
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(errors.AcquireError, match="not writable"):
    dl.download(str(lst), str(blocker / "out"), fast_config())


def test_second_run_into_same_folder_is_refused(tmp_path):
  lst = tmp_path / "urls.txt"
  lst.write_text("http://127.0.0.1:9/f/x.jpg 1\n")
  out = tmp_path / "out"
  with output_dir.claim_out_dir(str(out), {}):  # As if another run were on.
    with pytest.raises(errors.AcquireError, match="another run"):
      dl.download(str(lst), str(out), fast_config())
  assert not (out / journal_lib.JOURNAL_NAME).exists()
