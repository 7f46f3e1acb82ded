"""Preemption: SIGTERM checkpoints the current step and exits 0; after kill -9, rerunning the same
command continues, and metrics.jsonl holds the uninterrupted run's losses step for step."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from step_worker import JAX_CACHE  # noqa: E402  (the shared compilation cache)

TOTAL = 100
# A small, fast run: one layer, a loss line every step, a checkpoint every 5, no dev evaluation.
ARGS = ["--config=configs/demo.py:runlocal,mode=joint_sum", "--config.model.num_layers=1",
        f"--config.total_steps={TOTAL}", "--config.log_every=1", "--config.checkpoint_every=5",
        "--config.eval_every=0", "--config.dataset.num_test_images=16",
        "--config.eval.ce_queries_t2i=2", "--config.eval.ce_queries_i2t=2"]


def _start(workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **JAX_CACHE)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "rerank.train", *ARGS, f"--workdir={workdir}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _losses(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.endswith("\n")]
  return {r["step"]: r["loss"] for r in rows}


def _wait_for_step(proc, workdir, step, timeout=300):
  """Polls metrics.jsonl until it has a line for `step` or later; returns the newest step."""
  t_end = time.time() + timeout
  while time.time() < t_end:
    steps = _losses(workdir)
    if steps and max(steps) >= step:
      return max(steps)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.005)
  raise AssertionError(f"no step {step} in {workdir}/metrics.jsonl after {timeout}s")


def _latest_checkpoint(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return max(int(n) for n in names if n.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  proc = _start(workdir)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, TOTAL + 1))
  return losses


def test_sigterm_then_kill9_then_rerun_matches_uninterrupted(uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")

  # SIGTERM (a preemption notice) mid-run: checkpoint at the step it reached, exit 0.
  proc = _start(workdir)
  _wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stopped = max(_losses(workdir))
  assert stopped < TOTAL and f"stopped after step {stopped} (SIGTERM)" in out, out[-2000:]
  assert _latest_checkpoint(workdir) == stopped
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  # Same command again; kill -9 it some steps later (past at least one periodic checkpoint).
  proc = _start(workdir)
  killed_at = _wait_for_step(proc, workdir, stopped + 20)
  proc.kill()
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert killed_at < TOTAL  # it died in the middle of training, not after it

  # Same command once more: resumes from the newest complete checkpoint and finishes.
  proc = _start(workdir)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "resumed" in out
  assert os.path.exists(os.path.join(workdir, "results.json"))
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, TOTAL + 1))  # one line per step, none lost or repeated
  np.testing.assert_allclose([losses[s] for s in range(1, TOTAL + 1)],
                             [uninterrupted[s] for s in range(1, TOTAL + 1)], rtol=1e-6)
