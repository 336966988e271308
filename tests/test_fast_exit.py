"""Tests of mlimages_jax.fast_exit (the entry points' exit)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import atexit, sys
from mlimages_jax import fast_exit
atexit.register(lambda: open(sys.argv[1], "w").write("handler ran"))
class Teardown:
  def __del__(self, open=open, path=sys.argv[1] + ".teardown"):
    open(path, "w").write("teardown ran")
kept = Teardown()  # Collected by the interpreter's teardown, if it runs.
sys.stdout.write("buffered, no newline")  # A pipe: block-buffered.
fast_exit.exit_process({code})
"""


@pytest.mark.parametrize("code, status", [(3, 3), (None, 0)])
def test_exit_runs_the_handlers_flushes_and_skips_the_teardown(
    tmp_path, code, status):
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-c", PROGRAM.format(code=code),
                           str(out)], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == status, result.stderr
  assert result.stdout == "buffered, no newline"
  assert out.read_text() == "handler ran"
  assert not out.with_suffix(".teardown").exists()
