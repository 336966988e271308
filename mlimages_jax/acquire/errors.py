"""The one exception that stops an acquisition run.

Shared by the list reader's users, the journal, the output folder and the
downloader, so that the command line reports any of them as one error line.
"""

from __future__ import annotations


class AcquireError(RuntimeError):
  """A condition that stops a run (bad list, foreign journal, full disk)."""
