"""Joining a multi-process run (jax.distributed), bound in gin as `distributed`."""

from __future__ import annotations

import os

import gin
import jax

from flanjax.errors import UserError


@gin.configurable
def distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                process_id: int | None = None, auto: bool = False) -> None:
  """Joins a multi-process run through jax.distributed, before JAX touches a device.

  auto=True lets JAX detect the cluster (Cloud TPU VMs, SLURM, ...). Otherwise a
  coordinator address (gin, or $FLANJAX_COORDINATOR with $FLANJAX_NUM_PROCESSES
  and $FLANJAX_PROCESS_ID) starts one; with neither this is a single process.
  """
  coordinator_address = coordinator_address or os.environ.get("FLANJAX_COORDINATOR")
  if num_processes is None and os.environ.get("FLANJAX_NUM_PROCESSES"):
    num_processes = int(os.environ["FLANJAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("FLANJAX_PROCESS_ID"):
    process_id = int(os.environ["FLANJAX_PROCESS_ID"])
  if auto:
    jax.distributed.initialize()
  elif coordinator_address:
    if num_processes is None or process_id is None:
      raise UserError("distributed.coordinator_address needs num_processes and process_id "
                      "(or $FLANJAX_NUM_PROCESSES and $FLANJAX_PROCESS_ID)")
    # JAX waits for every process (up to its 5-minute timeout, then aborts): say so first.
    print(f"distributed: process {process_id} of {num_processes}, waiting for all of them at "
          f"{coordinator_address} (up to 300 s)", flush=True)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    return
  print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
