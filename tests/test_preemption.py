"""Tests of mlimages_jax.train.preemption with real signals (one process).

The runs themselves: tests/test_main.py (one process) and
tests/test_multihost.py (2 processes, JAX's preemption service).
"""

from __future__ import annotations

import os
import signal
import threading
import types

import pytest

from mlimages_jax.train import preemption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_next_boundary(signum, caplog, monkeypatch):
  before = signal.getsignal(signum)
  now = [100.0]  # The watcher's clock, moved by hand.
  monkeypatch.setattr(preemption, "time",
                      types.SimpleNamespace(monotonic=lambda: now[0]))
  with preemption.watch(start_step=10) as watcher:
    assert not watcher.reached(11)
    assert watcher.seconds_since_signal() is None
    with caplog.at_level("WARNING"):
      os.kill(os.getpid(), signum)  # Handled before os.kill returns.
    assert (f"{signal.Signals(signum).name} received after the boundary of "
            "step 11; stopping at the next one") in caplog.text
    assert watcher.reached(12)
    now[0] += 2.5
    assert watcher.seconds_since_signal() == 2.5
    # A second signal of the kind takes its default action (no save).
    assert signal.getsignal(signum) in (signal.SIG_DFL,
                                        signal.default_int_handler)
  assert signal.getsignal(signum) == before


def test_a_second_ctrl_c_interrupts_at_once():
  with preemption.watch(start_step=0):
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_no_signal_never_stops():
  with preemption.watch(start_step=0) as watcher:
    assert not any(watcher.reached(step) for step in range(1, 100))


def test_preempted_says_how_to_resume():
  error = preemption.Preempted(42, 1.25)
  assert error.step == 42
  assert str(error) == (
      "Preempted: stopped at step 42 1.2 s after the signal; its checkpoint "
      "is complete. Run the same command again to resume from step 42.")
  assert preemption.EXIT_CODE == 75


def test_a_run_in_another_thread_leaves_the_signals_alone(caplog):
  """A notebook trains in a background thread, where Python cannot install
  signal handlers: the run goes on without them."""
  before = signal.getsignal(signal.SIGTERM)
  result = {}

  def run():
    with caplog.at_level("INFO"):
      with preemption.watch(start_step=0) as watcher:
        result["stopped"] = any(watcher.reached(step) for step in range(1, 5))
        result["handler"] = signal.getsignal(signal.SIGTERM)

  thread = threading.Thread(target=run)
  thread.start()
  thread.join()
  assert result == {"stopped": False, "handler": before}
  assert "SIGTERM/SIGINT are not watched" in caplog.text


def test_a_stop_event_stops_at_the_next_boundary_like_a_signal(caplog):
  """The owner of a background run's thread sets the event: the first
  boundary after it stops the run; until then none does."""
  stop = threading.Event()
  with preemption.watch(start_step=3, stop=stop) as watcher:
    assert not any(watcher.reached(step) for step in range(4, 9))
    stop.set()
    with caplog.at_level("WARNING"):
      assert watcher.reached(9)
    assert "Stop requested: stopping at step 9 with a checkpoint" in (
        caplog.text)
    assert watcher.seconds_since_signal() >= 0
