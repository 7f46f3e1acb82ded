"""Multi-host start-up: detect how the job was launched and join the other processes.

`initialize()` must run before the first use of a jax device. It recognises, in this order:
- explicit: `RERANK_COORDINATOR=host:port`, `RERANK_NUM_PROCESSES`, `RERANK_PROCESS_ID` (set by
  `launch/local_multiprocess.sh`, or by hand on any cluster). They override everything below.
- slurm: `srun` with more than one task. jax reads the coordinator and ranks from SLURM's
  variables; we choose the GPUs: one task per GPU uses GPU `SLURM_LOCALID` (jax's default),
  one task per node uses every GPU of the node (jax alone would use only GPU 0 there).
- cluster: any other environment jax's own detection knows, seen from its variables: jax's
  coordinator variables (`JAX_COORDINATOR_ADDRESS` with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`), Open MPI (`mpirun`), a GKE TPU slice (`TPU_WORKER_HOSTNAMES`), a
  Kubernetes indexed job, or a Cloud TPU VM (libtpu and TPU chips present: jax finds the
  slice's other workers through the VM metadata server; a single-host VM joins alone).
- single: anything else; no set-up.
With `JAX_PLATFORMS=cpu` the CPU collectives go through gloo, so N processes on one machine act
like N hosts (the tests run every kind but "cluster" that way).
"""

import glob
import importlib.util
import os
import sys

import jax

_EXPLICIT = ("RERANK_COORDINATOR", "RERANK_NUM_PROCESSES", "RERANK_PROCESS_ID")
_JAX_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# What jax's SlurmCluster needs before it recognises a SLURM step.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def detect(env=None, tpu_vm: bool | None = None) -> str:
  """Which launch environment this process is in: "explicit", "slurm", "cluster" or "single".

  Args:
    env: the environment variables (default os.environ).
    tpu_vm: whether this is a Cloud TPU VM (default: libtpu installed and TPU chips present).
  Raises:
    ValueError: some but not all of the RERANK_* variables are set.
  """
  env = os.environ if env is None else env
  present = [k for k in _EXPLICIT if env.get(k)]
  if present:
    if len(present) != len(_EXPLICIT):
      missing = sorted(set(_EXPLICIT) - set(present))
      raise ValueError(f"multi-process launch: {', '.join(present)} set but {', '.join(missing)} "
                       f"missing; set all of {', '.join(_EXPLICIT)} or none")
    return "explicit"
  if all(k in env for k in _SLURM) and _int(env, "SLURM_NTASKS", 1) > 1:
    return "slurm"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if (all(env.get(k) for k in _JAX_EXPLICIT)
      or "OMPI_MCA_orte_hnp_uri" in env
      or len([h for h in hosts.split(",") if h.strip()]) > 1
      or ("KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env)
      or (_is_tpu_vm() if tpu_vm is None else tpu_vm)):
    return "cluster"
  return "single"


def initialize(env=None) -> str:
  """Joins the job's other processes (if any) with `jax.distributed.initialize`; returns the kind.

  Raises:
    ValueError: an incomplete or inconsistent launch environment (the message names it).
  """
  env = os.environ if env is None else env
  kind = detect(env)
  if kind == "single" or jax.distributed.is_initialized():
    return kind
  if env.get("JAX_PLATFORMS", "") == "cpu":
    # Cross-process CPU collectives need an implementation; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if kind == "explicit":
    num, pid = _int(env, "RERANK_NUM_PROCESSES"), _int(env, "RERANK_PROCESS_ID")
    if not 0 <= pid < num:
      raise ValueError(f"RERANK_PROCESS_ID: expected 0..{num - 1}; found {pid}")
    jax.distributed.initialize(coordinator_address=env["RERANK_COORDINATOR"],
                               num_processes=num, process_id=pid)
  elif kind == "slurm":
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids(env))
  elif all(env.get(k) for k in _JAX_EXPLICIT):
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=_int(env, "JAX_NUM_PROCESSES"),
                               process_id=_int(env, "JAX_PROCESS_ID"))
  else:
    jax.distributed.initialize()  # jax's own detection (TPU metadata, GKE, MPI, Kubernetes)
  return kind


def slurm_local_device_ids(env) -> list[int] | None:
  """The GPUs one SLURM task drives: None = jax's default (GPU `SLURM_LOCALID`, one per task).

  With a task per GPU, jax's default, or device 0 when the task sees a single GPU. With one
  task per node (`SLURM_NTASKS` == the step's nodes) the task takes every GPU the
  node gives it, counted from `CUDA_VISIBLE_DEVICES` or `SLURM_GPUS_ON_NODE`.
  `JAX_LOCAL_DEVICE_IDS=0,1,...` (read by jax) overrides both.
  """
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  visible = env.get("CUDA_VISIBLE_DEVICES", "")
  nodes = _int(env, "SLURM_STEP_NUM_NODES", 0) or _int(env, "SLURM_JOB_NUM_NODES", 0)
  if nodes != _int(env, "SLURM_NTASKS", 1):
    # A task per GPU. With --gpus-per-task=1 SLURM shows each task only its own GPU, device 0.
    return [0] if visible.strip() and len(visible.split(",")) == 1 else None
  gpus = len(visible.split(",")) if visible.strip() else _int(env, "SLURM_GPUS_ON_NODE", 0)
  if not gpus:
    if env.get("JAX_PLATFORMS", "") != "cpu":
      print("warning: one SLURM task per node, but neither CUDA_VISIBLE_DEVICES nor "
            "SLURM_GPUS_ON_NODE says how many GPUs it has; jax will use GPU 0 only. Set "
            "JAX_LOCAL_DEVICE_IDS=0,1,... or start one task per GPU.", file=sys.stderr)
    return None
  return list(range(gpus))


def describe(kind: str) -> str:
  """One line for the start of a log: how the job was launched and what it sees."""
  return (f"launch: {kind}, {jax.process_count()} process(es), {jax.device_count()} device(s) "
          f"({jax.local_device_count()} per process, {jax.devices()[0].platform}), "
          f"this is process {jax.process_index()}")


def is_main() -> bool:
  """Process 0 writes logs, metrics and results; every process joins checkpoint saves."""
  return jax.process_index() == 0


def log(*args, **kwargs) -> None:
  """print() on process 0 only."""
  if is_main():
    print(*args, **kwargs)


def _is_tpu_vm() -> bool:
  """libtpu installed and TPU chips attached (v4: /dev/accel*, v5 and later: /dev/vfio/N)."""
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def _int(env, name: str, default: int | None = None) -> int:
  value = env.get(name, "")
  if not value.strip() and default is not None:
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}: expected an integer; found {value!r}") from None
