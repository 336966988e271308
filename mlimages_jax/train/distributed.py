"""Many devices and many processes: joining the run, moving state across.

`jax.pmap` maps the train and eval steps over the local devices along the
axis `AXIS_NAME`; its collectives (``pmean``) span every device of every
process once `initialize_distributed` has joined them. The host-side
collectives of the loop (`sum_over_processes`) and the replication of the
train state onto the local devices live here too.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

AXIS_NAME = "batch"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run: explicit flags, a detected cluster, or none.

  With no flags, `jax.distributed.initialize()` auto-detects SLURM, Open MPI,
  Kubernetes and Cloud TPU environments; outside those it reports no
  coordinator and we run as a single process. CPU collectives use gloo (the
  setting only affects the CPU backend).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address or num_processes or process_id is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if "coordinator_address" not in str(e):
      raise
    logging.info("No cluster environment detected: single process.")


def replicate(tree: Any) -> Any:
  """Host copies on every local device, sharded exactly like pmap's outputs.

  Matching the output sharding (a mesh axis named like the pmap axis) keeps
  the train step from compiling twice; stacking NumPy copies avoids one tiny
  compilation per parameter shape.
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS_NAME,))
  sharding = jax.NamedSharding(mesh, jax.P(AXIS_NAME))
  count = jax.local_device_count()
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * count), sharding),
      jax.device_get(tree))


def unreplicate(tree: Any) -> Any:
  """The first local device's copy, as NumPy (no per-shape compilation).

  All leaves are fetched in one `jax.device_get` (transfers started together,
  then awaited), not one blocking round trip per leaf.
  """
  first = jax.tree.map(lambda x: x.addressable_shards[0].data, tree)
  return jax.tree.map(lambda x: x[0], jax.device_get(first))


def sum_over_processes(value: int) -> int:
  """The sum of a host integer over all processes (every process must call)."""
  total = np.asarray(value, np.int64)
  if jax.process_count() > 1:
    total = multihost_utils.process_allgather(total)
  return int(np.sum(total))
