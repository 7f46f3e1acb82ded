"""Preemption: SIGTERM checkpoints the current step and exits 0; after kill -9, rerunning the same
command continues, and metrics.jsonl holds the uninterrupted run's lines, one per step, in order.

The runs pause at a chosen step (the trainer's test hook RERANK_TEST_PAUSE, rerank/train.py), so
the signal lands at a known step whatever the machine's speed. Children write to files, not
pipes (a full pipe cannot stall them), every wait has a timeout, and a failing test kills the
children it started.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from step_worker import cache_env  # noqa: E402  (the shared compilation cache)

TOTAL = 30
SIGTERM_AT = 3  # SIGTERM arrives while the run pauses after this step: it stops right there
KILL_AT = 13  # kill -9 while the rerun pauses after this step (checkpoints 5 and 10 behind it)
# A small, fast run: one layer, a loss line every step, a checkpoint every 5, no dev evaluation.
ARGS = ["--config=configs/demo.py:runlocal,mode=joint_sum", "--config.model.num_layers=1",
        f"--config.total_steps={TOTAL}", "--config.log_every=1", "--config.checkpoint_every=5",
        "--config.eval_every=0", "--config.dataset.num_test_images=16",
        "--config.eval.ce_queries_t2i=2", "--config.eval.ce_queries_i2t=2"]


class _Run:
  """One `python -m rerank.train` child; output to files in `logs`; `cache`: the compilation
  cache's environment (`step_worker.cache_env`); optional pause after step `pause_at`."""

  def __init__(self, workdir, logs, name, cache, pause_at=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **cache)
    env.pop("XLA_FLAGS", None)
    self.gate = os.path.join(logs, f"{name}.go")
    if pause_at is not None:
      env["RERANK_TEST_PAUSE"] = f"{pause_at}:{self.gate}"
    self.out_path, self.err_path = (os.path.join(logs, f"{name}.{s}") for s in ("out", "err"))
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "rerank.train", *ARGS, f"--workdir={workdir}"],
          cwd=REPO, env=env, stdout=out, stderr=err, text=True)

  def output(self):
    with open(self.out_path) as f, open(self.err_path) as g:
      return f.read(), g.read()

  def wait_paused(self, timeout=300):
    """Returns once the child pauses at its step; fails if it exits or takes too long."""
    t_end = time.monotonic() + timeout
    while not os.path.exists(self.gate + ".paused"):
      assert self.proc.poll() is None, self.output()[1][-3000:]
      assert time.monotonic() < t_end, f"no pause within {timeout}s"
      time.sleep(0.01)

  def release(self):
    with open(self.gate, "w"):
      pass

  def finish(self, timeout=600):
    """(returncode, stdout, stderr) once the child exits."""
    self.proc.wait(timeout=timeout)
    return (self.proc.returncode, *self.output())


@contextlib.contextmanager
def _children():
  """Collects started runs; those still running when the block ends (a failure) are killed."""
  runs = []
  try:
    yield runs
  finally:
    for run in runs:
      if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait(timeout=60)


def _lines(workdir):
  """The rows of metrics.jsonl, line by line as written (every line complete)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    text = f.read()
  assert text.endswith("\n"), text[-200:]
  return [json.loads(line) for line in text.splitlines()]


def _steps(rows):
  return [r["step"] for r in rows]


def _latest_checkpoint(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return max(int(n) for n in names if n.isdigit())


def test_sigterm_then_kill9_then_rerun_matches_uninterrupted(tmp_path, tmp_path_factory):
  workdir, logs, cache = str(tmp_path / "run"), str(tmp_path), cache_env(tmp_path_factory)
  with _children() as runs:
    # The reference, uninterrupted, runs beside the interrupted runs.
    full = _Run(str(tmp_path / "full"), logs, "full", cache)
    runs.append(full)

    # SIGTERM (a preemption notice) mid-run: checkpoint at the step it reached, exit 0.
    runs.append(_Run(workdir, logs, "sigterm", cache, pause_at=SIGTERM_AT))
    runs[-1].wait_paused()
    runs[-1].proc.send_signal(signal.SIGTERM)
    runs[-1].release()
    rc, out, err = runs[-1].finish()
    assert rc == 0, err[-3000:]
    assert f"stopped after step {SIGTERM_AT} (SIGTERM)" in out, out[-2000:]
    assert _latest_checkpoint(workdir) == SIGTERM_AT
    assert _steps(_lines(workdir)) == list(range(1, SIGTERM_AT + 1))
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    # Same command again; kill -9 it some steps later, past periodic checkpoints.
    runs.append(_Run(workdir, logs, "kill9", cache, pause_at=KILL_AT))
    runs[-1].wait_paused()
    runs[-1].proc.kill()
    runs[-1].proc.wait(timeout=60)
    assert runs[-1].proc.returncode == -signal.SIGKILL
    # Lines up to the step before the pause; the resumed run rewrites those after its checkpoint.
    assert _steps(_lines(workdir)) == list(range(1, KILL_AT))

    # Same command once more: resumes from the newest complete checkpoint and finishes.
    runs.append(_Run(workdir, logs, "rerun", cache))
    rc, out, err = runs[-1].finish()
    assert rc == 0, err[-3000:]
    full_rc, _, full_err = full.finish()
    assert full_rc == 0, full_err[-3000:]
  uninterrupted = _lines(str(tmp_path / "full"))
  assert _steps(uninterrupted) == list(range(1, TOTAL + 1))
  resumed = [line for line in out.splitlines() if line.startswith("resumed from")]
  assert len(resumed) == 1 and int(resumed[0].split()[-1]) in (5, 10), out[-2000:]
  assert os.path.exists(os.path.join(workdir, "results.json"))
  rows = _lines(workdir)
  assert _steps(rows) == list(range(1, TOTAL + 1))  # one line per step, none lost or repeated
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in uninterrupted],
                             rtol=1e-6)
