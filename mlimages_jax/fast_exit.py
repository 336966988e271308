"""Ending a command's process without the interpreter's teardown.

With TensorFlow loaded, CPython's finalization (clearing every module,
collecting the object graph, running C++ static destructors) takes 2.6 s
after a bare ``import tensorflow`` and 4.4 s after a smoke training run
(measured on the 2-core machine of the README), and writes nothing: every
output of our commands is closed or flushed before they return. The entry
points (``main.py``, ``mlimages``, ``python -m mlimages_jax``) therefore run
the exit handlers that libraries registered (logging's flush, JAX's
distributed shutdown, ...), flush the standard streams and leave at once.
Only process entry points call this: a library function never ends its
caller's process.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_process(code: int | None) -> NoReturn:
  """Runs the atexit handlers, flushes stdout/stderr, exits with `code`."""
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # A closed pipe: nothing left to tell.
      pass
  os._exit(code or 0)
