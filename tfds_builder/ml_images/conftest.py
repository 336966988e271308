"""Gives the builder tests the project's shared fixtures (tests/conftest.py).

pytest only applies a conftest.py to tests below its folder, and TFDS wants
the builder test next to the builder, so this loads the project's conftest
under its own name and re-exports its fixtures instead of copying them.
"""

from __future__ import annotations

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("_mlimages_tests_conftest",
                                               _PATH)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)

shared_dir = _conftest.shared_dir
real_hierarchy_path = _conftest.real_hierarchy_path
