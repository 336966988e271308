"""Signal to exit: how long a training run takes to stop on SIGTERM.

Starts ``main.py`` (the demo by default) with ``--busy`` Python loops
spinning alongside at the same priority (a loaded machine; 0 = quiet), waits
for its first progress line (training under way, compiled), then
``--delay`` seconds more, sends SIGTERM and times the process until it exits
(it saves the step it stops at, waits for the save and exits with code 75).
The run's own line says how many seconds after the signal its checkpoint was
complete. What stopping waits for: the steps the host has already queued on
the devices (loop.py bounds them), one save, and the interpreter's exit.

  python benchmarks/stop_bench.py --busy=2 --repeats=3
  python benchmarks/stop_bench.py --repo=/tmp/old_checkout  # another version
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"step \d+/\d+ ")
STOPPED = re.compile(r"stopped at step (\d+) ([\d.]+) s after the signal")


def measure(repo: pathlib.Path, config: str, data_dir: str, busy: int,
            delay: float) -> dict[str, float]:
  """One run: seconds from SIGTERM to exit, and the run's own figures."""
  spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
              for _ in range(busy)]
  try:
    with tempfile.TemporaryDirectory() as workdir:
      run = subprocess.Popen(
          [sys.executable, str(repo / "main.py"), f"--config={config}",
           f"--workdir={workdir}", f"--config.data_dir={data_dir}"],
          cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)),
          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
      for line in run.stderr:
        if PROGRESS.search(line):
          break
      else:
        raise RuntimeError(f"the run ended before training (rc {run.wait()})")
      time.sleep(delay)
      run.send_signal(signal.SIGTERM)
      start = time.perf_counter()
      rest = run.stderr.read()
      code = run.wait()
      seconds = time.perf_counter() - start
  finally:
    for spinner in spinners:
      spinner.kill()
      spinner.wait()
  stopped = STOPPED.search(rest)
  if code != 75 or not stopped:
    raise RuntimeError(f"exit code {code}, expected 75:\n{rest[-2000:]}")
  return {"exit_seconds": round(seconds, 2),
          "saved_seconds": float(stopped.group(2)),
          "step": int(stopped.group(1))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repo", default=str(REPO),
                      help="checkout whose main.py runs")
  parser.add_argument("--config", default="configs/pretrain.py:demo")
  parser.add_argument("--data_dir", default=str(
      pathlib.Path(tempfile.gettempdir()) / "mlimages_stop_bench_tfds"),
                      help="kept between runs: the demo builds it once")
  parser.add_argument("--busy", type=int, default=2,
                      help="busy loops alongside (0: quiet)")
  parser.add_argument("--delay", type=float, default=5.0,
                      help="seconds after the first progress line")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  runs = [measure(pathlib.Path(args.repo), args.config, args.data_dir,
                  args.busy, args.delay) for _ in range(args.repeats)]
  for run in runs:
    print(json.dumps(run))
  exits = [run["exit_seconds"] for run in runs]
  print(f"signal to exit with {args.busy} busy loops: "
        f"{min(exits):.1f}-{max(exits):.1f} s over {len(exits)} runs")
  print(json.dumps({"benchmark": "stop_on_sigterm", "value": max(exits),
                    "unit": "s", "baseline": None, "ratio": None,
                    "target": None}))


if __name__ == "__main__":
  main()
