"""Seconds from a preemption signal to the exit of a training run.

`main.py` with the smoke config (ml_images/synthetic, built on the first run
into a temporary directory) gets SIGTERM while it evaluates at step 2; it
finishes the evaluation, saves step 3 and exits with 75. The tests check
that behaviour (tests/test_main.py, tests/test_multihost.py); the time it
takes depends on the machine's load, so it is measured here: ~2 s on an idle
2-core machine, 18 s on a loaded one.

  python benchmarks/preemption_stop_bench.py
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def seconds_to_stop(root: pathlib.Path) -> float:
  """Runs the smoke config, signals it at the step-2 evaluation; returns the
  seconds from the signal to the exit."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  process = subprocess.Popen(
      [sys.executable, str(REPO / "main.py"),
       f"--config={REPO / 'configs' / 'pretrain.py'}:smoke",
       f"--workdir={root / 'work'}", f"--config.data_dir={root / 'tfds'}",
       "--config.eval_every_steps=2"],
      env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  sent = None
  for line in process.stderr:
    if sent is None and "step 2: evaluating" in line:
      process.send_signal(signal.SIGTERM)
      sent = time.perf_counter()
  process.wait()
  if sent is None or process.returncode != 75:
    raise SystemExit(f"the run was not preempted (exit {process.returncode})")
  return time.perf_counter() - sent


def main() -> None:
  with tempfile.TemporaryDirectory() as root:
    seconds = seconds_to_stop(pathlib.Path(root))
  print(f"SIGTERM during an evaluation to exit 75 (smoke config, 2 CPU "
        f"devices): {seconds:.1f} s")
  print(json.dumps({"benchmark": "preemption_stop", "value": seconds,
                    "unit": "s", "baseline": None, "ratio": None,
                    "target": None}))


if __name__ == "__main__":
  main()
