"""pyproject.toml's pytest warning filters do what they say.

A deprecation our code triggers fails the test: our own warnings, and a
library's warning whose stacklevel points at our call. A library's warning
about its own internals is only shown. Checked by running pytest with the
project's configuration on three small tests.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

LIBRARY = '''
import warnings


def old_api():
  warnings.warn("old_api is deprecated", DeprecationWarning, stacklevel=2)


def internal():
  warnings.warn("internal detail", DeprecationWarning)
'''

TESTS = '''
import warnings

import some_library


def test_calls_a_deprecated_api():
  some_library.old_api()


def test_library_warns_about_itself():
  some_library.internal()


def test_our_own_deprecation():
  warnings.warn("ours", DeprecationWarning)
'''


def test_deprecations_of_our_code_fail_and_others_are_shown(tmp_path):
  (tmp_path / "some_library.py").write_text(LIBRARY)
  (tmp_path / "test_semantics.py").write_text(TESTS)
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
       "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
       "--rootdir", str(tmp_path), str(tmp_path / "test_semantics.py")],
      capture_output=True, text=True, cwd=tmp_path)
  out = result.stdout
  assert "2 failed, 1 passed" in out, out
  assert "FAILED test_semantics.py::test_calls_a_deprecated_api" in out
  assert "FAILED test_semantics.py::test_our_own_deprecation" in out
  assert "DeprecationWarning: internal detail" in out  # Shown, not fatal.
