"""What tests share: per-session scratch folders in the environment, reserved ports, one run.

Subprocesses inherit os.environ, so setting these once here reaches every command a test runs
(through `dict(os.environ, ...)`), without a fixed path that two test runs on one machine would
share:
  JAX_COMPILATION_CACHE_DIR  the persistent compilation cache of the test subprocesses: they
                             compile the same small programs again and again, and on a 2-core
                             machine compiling is most of their time
  RERANK_LOG_DIR             where launch/local_multiprocess.sh writes the logs of processes
                             1..N-1 when a test does not give its own folder
The pytest process itself imported jax while collecting, before these are set, so its own
compilations stay in memory as before.
"""

import contextlib
import os
import sys

import pytest

from procs import hold_port, run_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = ["-m", "rerank.train", "--config=configs/demo.py:runlocal"]


@pytest.fixture(scope="session", autouse=True)
def _session_scratch(tmp_path_factory):
  values = {
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
      # Cache every program: most of the suite's are small but compiled by many processes.
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "RERANK_LOG_DIR": str(tmp_path_factory.mktemp("launch_logs")),
  }
  with pytest.MonkeyPatch.context() as mp:
    for name, value in values.items():
      mp.setenv(name, value)
    yield values


@pytest.fixture
def reserve_port():
  """`reserve_port(port=0) -> port`: held until the test ends (see procs.hold_port)."""
  with contextlib.ExitStack() as held:

    def reserve(port: int = 0) -> int:
      return held.enter_context(hold_port(port)).getsockname()[1]

    yield reserve


@pytest.fixture(scope="session")
def runlocal_run(tmp_path_factory):
  """The README's `python -m rerank.train --config=configs/demo.py:runlocal --workdir=DIR` on one
  CPU device, once per session for the tests that read its workdir (copy it to write in it):
  (workdir, CompletedProcess)."""
  work = str(tmp_path_factory.mktemp("runlocal") / "work")
  # One process on one device, whatever cluster this runs in.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_COORDINATOR", "TPU_", "RERANK_COORDINATOR",
                              "RERANK_NUM_PROCESSES", "RERANK_PROCESS_ID", "XLA_FLAGS"))}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  res = run_group([sys.executable, *RUNLOCAL, f"--workdir={work}"], timeout=480, cwd=REPO,
                  env=env)
  assert res.returncode == 0, res.stderr[-3000:]
  return work, res
