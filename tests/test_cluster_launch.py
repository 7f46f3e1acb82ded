"""The launchers: launch/tpu_pod.sh against a stand-in `gcloud` that runs each worker's script on
this machine; launch/local_multiprocess.sh's port, logs and failures."""

import os
import socket
import subprocess
import tarfile
import time

import pytest

import procs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(REPO, "launch", "tpu_pod.sh")
LOCAL = os.path.join(REPO, "launch", "local_multiprocess.sh")

# `gcloud compute tpus tpu-vm scp SRC TPU:DST ...` copies SRC to $FAKE_ROOT/DST;
# `... ssh TPU ... --command=SCRIPT` records SCRIPT, and runs it with bash when FAKE_RUN=1.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >>"$FAKE_ROOT/calls.log"
case "$4" in
  scp) mkdir -p "$FAKE_ROOT/$(dirname "${6#*:}")"; cp "$5" "$FAKE_ROOT/${6#*:}" ;;
  ssh) for a in "$@"; do [[ "$a" == --command=* ]] && script=${a#--command=}; done
       printf '%s\n' "$script" >"$FAKE_ROOT/script.$#.sh"
       if [[ "${FAKE_RUN:-}" == 1 ]]; then exec bash -c "$script"; fi ;;
esac
"""


@pytest.fixture
def pod(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in [("gcloud", FAKE_GCLOUD), ("curl", "#!/bin/sh\necho 0\n")]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_ROOT=str(tmp_path),
             TPU_NAME="my-v4-32", ZONE="us-central2-b", HOME=str(tmp_path / "home"),
             REMOTE_DIR=str(tmp_path / "repo"), LOG_DIR=str(tmp_path / "logs"))
  os.makedirs(env["REMOTE_DIR"])

  def call(*args, **extra):
    return subprocess.run([POD, *args], env=dict(env, **extra), capture_output=True, text=True,
                          timeout=60)
  return call


def test_scripts_parse():
  for name in os.listdir(os.path.join(REPO, "launch")):
    if name.endswith((".sh", ".sbatch")):
      r = subprocess.run(["bash", "-n", os.path.join(REPO, "launch", name)], capture_output=True,
                         text=True, timeout=60)
      assert r.returncode == 0, (name, r.stderr)


def test_usage_errors(pod):
  for args in [(), ("launch",), ("run",), ("logs", "x"), ("logs", "1x"), ("stop", "now")]:
    r = pod(*args)
    assert r.returncode == 2 and "usage" in r.stderr, args
  r = subprocess.run([POD, "stop"], capture_output=True, text=True, timeout=60,
                     env={k: v for k, v in os.environ.items() if k != "TPU_NAME"})
  assert r.returncode != 0 and "TPU_NAME" in r.stderr


def test_setup_ships_the_repository_only_and_installs_python_311(pod, tmp_path):
  r = pod("setup")
  assert r.returncode == 0, r.stderr
  with tarfile.open(tmp_path / "tmp" / "rerank.tar.gz") as t:
    names = set(t.getnames())
  tracked = set(subprocess.run(["git", "-C", REPO, "ls-files"], capture_output=True, text=True,
                               check=True, timeout=60).stdout.split())
  assert "setup.py" in names and "launch/tpu_pod.sh" in names
  assert names <= tracked | {os.path.dirname(n) for n in names}  # files git tracks, their dirs
  calls = (tmp_path / "calls.log").read_text()
  assert "--worker=all" in calls and "--zone=us-central2-b" in calls
  script = next(p for p in tmp_path.glob("script.*.sh")).read_text()
  assert 'uv venv -q --python ">=3.11"' in script and '-e "$dir[tpu]"' in script
  assert subprocess.run(["bash", "-n", "-c", script], timeout=60).returncode == 0


def test_dry_run_prints_the_gcloud_commands(pod, tmp_path):
  r = pod("stop", DRY_RUN="1")
  assert r.returncode == 0, r.stderr
  # One shell-quoted line per gcloud call, runnable as printed.
  assert r.stdout.startswith("gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b "
                             "--worker=all $'--command=set -euo pipefail;")
  assert len(r.stdout.splitlines()) == 1
  assert not (tmp_path / "calls.log").exists()


def test_run_is_detached_with_a_log_per_worker_then_logs_and_stop(pod, tmp_path):
  prog = ("import signal, sys, time\n"
          "signal.signal(signal.SIGTERM, lambda *_: (print('SIGTERM: checkpoint', flush=True),"
          " sys.exit(0)))\n"
          "print('args', sys.argv[1:], flush=True)\n"
          "time.sleep(60)\n")
  t0 = time.time()
  r = pod("run", "python3", "-c", prog, "two words", FAKE_RUN="1")
  assert r.returncode == 0, r.stderr
  assert time.time() - t0 < 30 and "worker 0: started" in r.stdout  # returned while it runs
  log = tmp_path / "logs" / "latest.w0.log"
  pid = int((tmp_path / "logs" / "pid.w0").read_text())
  _wait_for(lambda: "args" in log.read_text())
  assert "args ['two words']" in log.read_text()

  again = pod("run", "true", FAKE_RUN="1")
  assert again.returncode == 1 and "still runs" in again.stderr

  shown = pod("logs", "0", FAKE_RUN="1")
  assert shown.returncode == 0 and "args ['two words']" in shown.stdout

  stopped = pod("stop", FAKE_RUN="1")
  assert stopped.returncode == 0 and "SIGTERM sent" in stopped.stdout
  _wait_for(lambda: not _alive(pid))
  assert "SIGTERM: checkpoint" in log.read_text()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A child of an exited shell may linger as a zombie until init reaps it.
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split(") ")[1][0] != "Z"


def _wait_for(cond, timeout: float = 20.0) -> None:
  end = time.time() + timeout
  while not cond():
    assert time.time() < end, "timed out"
    time.sleep(0.1)


# ---- launch/local_multiprocess.sh -----------------------------------------------------------


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
  # Process 0 would run for 5 minutes (as a process waits for a dead peer in a collective):
  # unless the launcher stops it, the run outlasts the timeout and the test fails.
  script = 'if [ "$RERANK_PROCESS_ID" = 1 ]; then exit 3; fi; exec sleep 300'
  r = procs.run_group([LOCAL, "2", "sh", "-c", script], timeout=60,
                      env=dict(os.environ, RERANK_LOG_DIR=str(tmp_path)))
  assert r.returncode == 3, r.stderr  # the failed process's status, not the stopped one's


def test_local_launcher_holds_the_port_it_chose(tmp_path):
  """No other program can take the coordinator port between the launcher's choice and the
  coordinator's bind; one that shares it (SO_REUSEPORT, as gRPC) can."""
  probe = ("import os, socket\n"
           "port = int(os.environ['RERANK_COORDINATOR'].rsplit(':', 1)[1])\n"
           "plain = socket.socket()\n"
           "try:\n"
           "  plain.bind(('127.0.0.1', port)); print('plain bind: taken')\n"
           "except OSError:\n"
           "  print('plain bind: refused')\n"
           "shared = socket.socket()\n"
           "shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
           "shared.bind(('127.0.0.1', port)); print('shared bind: ok')\n")
  env = dict(os.environ, RERANK_LOG_DIR=str(tmp_path))
  env.pop("RERANK_PORT", None)
  r = procs.run_group([LOCAL, "1", "python3", "-c", probe], timeout=60, env=env)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == ["plain bind: refused", "shared bind: ok"]


def test_local_launcher_logs_to_a_new_folder_by_default():
  env = {k: v for k, v in os.environ.items() if k != "RERANK_LOG_DIR"}
  r = procs.run_group([LOCAL, "2", "sh", "-c", 'echo "hello from $RERANK_PROCESS_ID"'],
                      timeout=60, env=env)
  assert r.returncode == 0 and r.stdout == "hello from 0\n", (r.stdout, r.stderr)
  folder = r.stderr.split(" log to ")[1].split("/rerank_proc<i>.log")[0]
  try:
    with open(os.path.join(folder, "rerank_proc1.log")) as f:
      assert f.read() == "hello from 1\n"
    assert os.listdir(folder) == ["rerank_proc1.log"]  # new: nothing of an earlier run
  finally:
    os.remove(os.path.join(folder, "rerank_proc1.log"))
    os.rmdir(folder)


def test_hold_port_keeps_others_off():
  with procs.hold_port() as held:
    port = held.getsockname()[1]
    with socket.socket() as other, pytest.raises(OSError):
      other.bind(("127.0.0.1", port))
