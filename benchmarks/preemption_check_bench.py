"""Per-step cost of agreeing on a preemption step across processes.

The training loop asks at every step boundary whether all processes must
stop (mlimages_jax/train/preemption.py). It uses JAX's preemption service
(`multihost_utils.reached_preemption_sync_point`); the alternative is an
all-reduce of a "signal received" flag at each boundary
(`multihost_utils.process_allgather`). This runs 2 processes x 2 CPU
devices (gloo) and times both per call; the baseline is the all-reduce.

  python benchmarks/preemption_check_bench.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

CALLS = 200


def worker(process_id: int, port: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
  flag = np.asarray(False)
  multihost_utils.process_allgather(flag)  # Compile once.
  t0 = time.perf_counter()
  for _ in range(CALLS):
    np.any(multihost_utils.process_allgather(flag))
  allreduce = (time.perf_counter() - t0) / CALLS
  t0 = time.perf_counter()
  for i in range(CALLS * 100):
    multihost_utils.reached_preemption_sync_point(i)
  service = (time.perf_counter() - t0) / (CALLS * 100)
  if process_id == 0:
    print(json.dumps({"allreduce_s": allreduce, "service_s": service}))
  jax.distributed.shutdown()


def main() -> None:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  processes = [subprocess.Popen([sys.executable, __file__, str(i), str(port)],
                                env=env, stdout=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  result = json.loads(outputs[0].strip().splitlines()[-1])
  service, allreduce = result["service_s"] * 1e6, result["allreduce_s"] * 1e6
  print(f"per step boundary, 2 processes x 2 CPU devices (gloo): preemption "
        f"service {service:.2f} us, all-reduce of a flag {allreduce:.0f} us")
  print(json.dumps({"benchmark": "preemption_check", "value": service,
                    "unit": "us per step", "baseline": allreduce,
                    "ratio": allreduce / service, "target": None}))


if __name__ == "__main__":
  if len(sys.argv) == 3:
    worker(int(sys.argv[1]), int(sys.argv[2]))
  else:
    main()
