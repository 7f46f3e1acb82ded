"""Multi-host start-up: detect how the job was launched and join the other processes.

Three launch environments are recognised, in this order:
- explicit: `RERANK_COORDINATOR=host:port`, `RERANK_NUM_PROCESSES`, `RERANK_PROCESS_ID` (set by
  `launch/local_multiprocess.sh`, or by hand on any cluster). With `JAX_PLATFORMS=cpu` the CPU
  collectives go through gloo, so N processes on one machine act like N hosts.
- TPU VM slice: several workers in `TPU_WORKER_HOSTNAMES` (set on every worker by Cloud TPU);
  jax reads the rest from the TPU metadata.
- SLURM: `SLURM_JOB_ID` with more than one task in `SLURM_NTASKS` (one task per node or per
  GPU, started by `srun`); jax reads the coordinator and ranks from the SLURM variables.
Anything else is a single process and needs no set-up. `initialize()` must run before the
first use of a jax device.
"""

import os

import jax

_EXPLICIT = ("RERANK_COORDINATOR", "RERANK_NUM_PROCESSES", "RERANK_PROCESS_ID")


def detect(env=None) -> str:
  """Which launch environment this process is in: "explicit", "tpu", "slurm" or "single"."""
  env = os.environ if env is None else env
  present = [k for k in _EXPLICIT if env.get(k)]
  if present:
    if len(present) != len(_EXPLICIT):
      missing = sorted(set(_EXPLICIT) - set(present))
      raise ValueError(f"multi-process launch: {', '.join(present)} set but {', '.join(missing)} "
                       f"missing; set all of {', '.join(_EXPLICIT)} or none")
    return "explicit"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return "tpu"
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  return "single"


def initialize(env=None) -> str:
  """Joins the job's other processes (if any) with `jax.distributed.initialize`; returns the kind."""
  env = os.environ if env is None else env
  kind = detect(env)
  if kind == "single" or jax.distributed.is_initialized():
    return kind
  if kind == "explicit":
    if env.get("JAX_PLATFORMS", "") == "cpu":
      # Cross-process CPU collectives need an implementation; gloo ships with jaxlib.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    num, pid = int(env["RERANK_NUM_PROCESSES"]), int(env["RERANK_PROCESS_ID"])
    if not 0 <= pid < num:
      raise ValueError(f"RERANK_PROCESS_ID: expected 0..{num - 1}; found {pid}")
    jax.distributed.initialize(coordinator_address=env["RERANK_COORDINATOR"],
                               num_processes=num, process_id=pid)
  else:
    jax.distributed.initialize()  # jax's own TPU / SLURM cluster detection fills in the rest
  return kind


def is_main() -> bool:
  """Process 0 writes logs, metrics and results; every process joins checkpoint saves."""
  return jax.process_index() == 0


def log(*args, **kwargs) -> None:
  """print() on process 0 only."""
  if is_main():
    print(*args, **kwargs)
