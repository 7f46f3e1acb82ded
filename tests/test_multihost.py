"""Multi-host: 2 processes x 4 CPU devices (launch/local_multiprocess.sh) = the 1-device steps."""

import json
import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import step_worker  # noqa: E402

LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")


def _launch(args, timeout, **kwargs) -> subprocess.CompletedProcess:
  """Runs the launcher in a process group of its own: on a timeout the group (the launcher and
  every process it started) is killed, not the launcher alone."""
  proc = subprocess.Popen([LAUNCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True, **kwargs)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_two_processes_of_four_devices_equal_one_device(tmp_path, tmp_path_factory):
  out = str(tmp_path)
  # fsdp + tp: parameters split over both mesh axes, the data axis across the two processes.
  env = dict(os.environ, RERANK_LOG_DIR=out, PYTHONPATH=REPO,
             **step_worker.cache_env(tmp_path_factory))
  env.pop("XLA_FLAGS", None)
  r = _launch(["2", sys.executable, os.path.join(REPO, "tests", "step_worker.py"), f"--out={out}",
               "--layouts=fsdp_tp"], timeout=600, env=env, cwd=REPO)
  other = open(os.path.join(out, "rerank_proc1.log")).read() if os.path.exists(
      os.path.join(out, "rerank_proc1.log")) else ""
  assert r.returncode == 0, r.stderr[-2000:] + other[-2000:]
  with open(os.path.join(out, "fsdp_tp.json")) as f:
    info = json.load(f)
  assert info["processes"] == 2 and info["devices"] == 8 and info["mesh"] == {"data": 4, "model": 2}
  # Each process holds a quarter of the data axis and half of the model axis of this kernel.
  assert info["layout"]["intermediate"]["spec"] == ["data", "model"]
  assert info["layout"]["intermediate"]["shard"] == [16, 64]
  # The reference: the same step on this test process's first device.
  ref = step_worker.build_step()
  step_worker.run_layout("ref", *ref, out)
  step_worker.assert_trained(out, "ref")
  step_worker.assert_same_step(out, "fsdp_tp")


def test_launcher_usage_error(tmp_path):
  r = _launch(["two", "true"], timeout=60)
  assert r.returncode == 2 and "usage" in r.stderr
  r = _launch(["2", "sh", "-c", 'exit "$RERANK_PROCESS_ID"'], timeout=60,
              env=dict(os.environ, RERANK_LOG_DIR=str(tmp_path)))
  assert r.returncode == 1  # process 1 failed: the launcher reports it
