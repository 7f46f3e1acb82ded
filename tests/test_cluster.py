"""Cluster start-up: a SLURM-launched 2-process job trains like one process; launch detection."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from configs.paper import coco_joint
from rerank.training import distributed
from rerank.training import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")
TRAIN = [sys.executable, "-m", "rerank.train", "--config=configs/demo.py:runlocal"]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("RERANK_", "SLURM_", "JAX_COORDINATOR", "TPU_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  return env


def _slurm_job_id(reserve_port) -> str:
  """A job id whose coordinator port (jax: 61440 + id % 4096) is held for this test."""
  for _ in range(50):
    job = random.randrange(10_000, 1_000_000)
    try:
      reserve_port(61440 + job % 4096)
      return str(job)
    except OSError:
      continue
  pytest.skip("no free port in jax's SLURM coordinator range")


def _stop(procs) -> None:
  """Kills what is left of each process's group (all of it when a test failed half-way)."""
  for p in procs:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)


def _losses(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {(r["step"], k): v for r in rows for k, v in r.items() if k.endswith("loss")}


def test_slurm_two_processes_train_like_one(tmp_path, reserve_port, runlocal_run):
  config = demo.get_config("runlocal")
  # The last step is a dev-evaluation step too: both checkpoint managers save it at once.
  assert config.total_steps % config.eval_every == 0
  assert config.total_steps % config.checkpoint_every == 0
  # The reference: `TRAIN` on one device, run once for the tests that share it (conftest.py).
  one, two = runlocal_run[0], str(tmp_path / "two")
  assert runlocal_run[1].args[:-1] == TRAIN

  job = _slurm_job_id(reserve_port)
  procs = []
  try:
    for i in range(2):
      procs.append(subprocess.Popen(
          TRAIN + [f"--workdir={two}"], cwd=REPO, text=True, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, start_new_session=True,
          env=_env(4, SLURM_JOB_ID=job, SLURM_NTASKS="2", SLURM_PROCID=str(i),
                   SLURM_LOCALID=str(i), SLURM_STEP_NODELIST="localhost")))
    outs = [p.communicate(timeout=480)[0] for p in procs]
  finally:
    _stop(procs)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "launch: slurm, 2 process(es), 8 device(s) (4 per process, cpu)" in outs[0]
  assert "mesh {'data': 8, 'model': 1}" in outs[0]
  # Both saves of the last step completed (the newest and the best checkpoint).
  assert str(config.total_steps) in os.listdir(os.path.join(two, "checkpoints"))
  assert os.listdir(os.path.join(two, "best"))
  assert os.path.exists(os.path.join(two, "results.json"))

  ref_losses, losses = _losses(one), _losses(two)
  assert ref_losses.keys() == losses.keys() and len(ref_losses) >= 3
  keys = sorted(ref_losses)
  np.testing.assert_allclose([losses[k] for k in keys], [ref_losses[k] for k in keys],
                             rtol=2e-4, atol=1e-5)


def test_both_checkpoint_managers_save_the_same_step_on_two_processes(tmp_path):
  # Without distinct barrier names per manager, the overlapping saves fail on a barrier that is
  # "already ongoing" after orbax's 5-minute timeout; the timeout here catches that sooner.
  env = dict(os.environ, PYTHONPATH=REPO, RERANK_LOG_DIR=str(tmp_path))
  env.pop("XLA_FLAGS", None)
  p = subprocess.Popen([LAUNCH, "2", sys.executable, os.path.join(REPO, "tests",
                                                                  "checkpoint_worker.py"),
                        str(tmp_path / "w")], env=env, cwd=REPO, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    out = p.communicate(timeout=180)[0]
  except subprocess.TimeoutExpired:
    pytest.fail("the two managers' saves of one step did not finish (barrier collision?)")
  finally:
    _stop([p])
  other = (tmp_path / "rerank_proc1.log").read_text()
  assert p.returncode == 0, out[-3000:] + other[-3000:]
  assert "restored best (step 8), newest step 8" in out


SLURM = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_PROCID="0", SLURM_LOCALID="0")


@pytest.mark.parametrize("env,kind", [
    ({}, "single"),
    ({"RERANK_COORDINATOR": "h:1", "RERANK_NUM_PROCESSES": "2", "RERANK_PROCESS_ID": "1"}, "explicit"),
    # RERANK_* override whatever the cluster says.
    ({"RERANK_COORDINATOR": "h:1", "RERANK_NUM_PROCESSES": "2", "RERANK_PROCESS_ID": "1",
      **SLURM, "SLURM_NTASKS": "16"}, "explicit"),
    ({**SLURM, "SLURM_NTASKS": "16"}, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, "single"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "single"),  # sbatch's shell, outside srun
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "cluster"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "cluster"),  # GKE TPU slice
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "single"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:3"}, "cluster"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}, "cluster"),
])
def test_launch_environment_detection(env, kind):
  assert distributed.detect(env, tpu_vm=False) == kind


def test_cloud_tpu_vm_uses_jax_detection():
  # A plain TPU VM slice sets no variables: jax finds its workers through the metadata server.
  assert distributed.detect({}, tpu_vm=True) == "cluster"


@pytest.mark.parametrize("env,ids", [
    # One task per GPU (2 nodes x 8 tasks): jax's default, GPU SLURM_LOCALID.
    (dict(SLURM_NTASKS="16", SLURM_STEP_NUM_NODES="2", SLURM_GPUS_ON_NODE="8"), None),
    # ... started with --gpus-per-task=1: each task sees only its own GPU.
    (dict(SLURM_NTASKS="16", SLURM_STEP_NUM_NODES="2", CUDA_VISIBLE_DEVICES="5"), [0]),
    # One task per node: every GPU of the node.
    (dict(SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_GPUS_ON_NODE="8"), list(range(8))),
    (dict(SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2", CUDA_VISIBLE_DEVICES="0,1,2,3"), [0, 1, 2, 3]),
    # The user's own choice wins.
    (dict(SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
          JAX_LOCAL_DEVICE_IDS="0,1"), None),
    # CPU: nothing to choose.
    (dict(SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="2", JAX_PLATFORMS="cpu"), None),
])
def test_slurm_gpus_per_task(env, ids):
  assert distributed.slurm_local_device_ids(env) == ids


def test_bad_launch_variables_are_errors():
  with pytest.raises(ValueError, match="RERANK_PROCESS_ID"):
    distributed.detect({"RERANK_COORDINATOR": "h:1", "RERANK_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="SLURM_NTASKS: expected an integer; found 'x'"):
    distributed.detect({**SLURM, "SLURM_NTASKS": "x"})


def test_a_batch_that_does_not_split_over_the_devices_stops_training_at_start_up(tmp_path):
  r = subprocess.run(TRAIN + [f"--workdir={tmp_path / 'w'}", "--config.batch_size=12"],
                     env=_env(8), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert ("config.batch_size: expected a multiple of 8 (batch axis 'data' of mesh "
          "{'data': 8, 'model': 1} x grad_accum 1); found 12") in r.stderr
  assert not (tmp_path / "w").exists()  # stopped before writing anything


def test_paper_batch_fits_up_to_128_data_parallel_devices():
  config = coco_joint.get_config()
  assert config.batch_size == 128
  assert not [p for p in validate.problems(config, num_devices=128, files=False) if "batch" in p]
  assert ("config.batch_size: expected a multiple of 256 (batch axis 'data' of mesh "
          "{'data': 256, 'model': 1} x grad_accum 1); found 128"
          in validate.problems(config, num_devices=256, files=False))
