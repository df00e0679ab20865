"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

Which processes form the job comes from, in order:
  1. explicit arguments (the trainer's `--coordinator_address`,
     `--num_processes`, `--process_id` flags);
  2. the environment variables METIS_COORDINATOR_ADDRESS, METIS_NUM_PROCESSES,
     METIS_PROCESS_ID (set by `launch/local_multiprocess.py` and
     `launch/gpu_slurm.sbatch`);
  3. on a Cloud TPU VM, a bare `jax.distributed.initialize()`, which asks
     the TPU metadata for the slice's workers (a single-host slice then
     simply has one process).
Otherwise the job is a single process and nothing is initialized.

On CPU, cross-process collectives need gloo
(`jax_cpu_collectives_implementation`), which is switched on here.
"""

import glob
import importlib.util
import os
from typing import Optional

import jax
from absl import logging

ENV_COORDINATOR = "METIS_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "METIS_NUM_PROCESSES"
ENV_PROCESS_ID = "METIS_PROCESS_ID"
# Environment variables that mark a Cloud TPU worker.
TPU_VM_MARKERS = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")


def on_tpu_vm() -> bool:
  """A Cloud TPU VM: TPU chips attached (/dev/accel* on v2-v4, /dev/vfio on v5+) and libtpu
  installed, or the TPU worker environment variables set."""
  if any(m in os.environ for m in TPU_VM_MARKERS):
    return True
  chips = glob.glob("/dev/accel*") or os.path.isdir("/dev/vfio")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None) -> dict:
  """The arguments for `jax.distributed.initialize`, or {} for a single process.

  Returns:
    {'coordinator_address', 'num_processes', 'process_id'} when a
    multi-process job is described; {'auto': True} on a Cloud TPU VM; {}
    otherwise (one process).
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  given = [x is not None for x in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ValueError("a multi-process job needs all of coordinator address, number of processes "
                       f"and process id (got {coordinator_address!r}, {num_processes!r}, "
                       f"{process_id!r}; flags --coordinator_address/--num_processes/--process_id "
                       f"or env {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})")
    if num_processes <= 1:
      return {}
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
    return dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id)
  return {"auto": True} if on_tpu_vm() else {}


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, platform: Optional[str] = None) -> None:
  """Initializes the JAX distributed runtime if this is a multi-process job.

  Must run before anything touches the devices. `platform` ('cpu' to force
  gloo collectives) defaults to the JAX_PLATFORMS environment variable.
  """
  args = resolve(coordinator_address, num_processes, process_id)
  if not args:
    return
  platform = platform or os.environ.get("JAX_PLATFORMS", "")
  if platform.split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.pop("auto", False):
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(**args)
  logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
