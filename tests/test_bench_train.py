"""The training benchmark: its size table, its FLOP count, and a quick run (step and input times)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import common as config_common
from rerank import bench_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sizes_match_the_configs():
  assert bench_train.SIZES == config_common.SIZES


def test_step_flops_by_hand():
  # One layer, hidden 2, mlp 4, batch 1, text 3, 1 region (feature+box 2054 wide).
  f_text = 2 * 1 * 3 * (4 * 4 + 2 * 2 * 4) + 4 * 1 * 9 * 2 + 2 * 4        # 192 + 72 + 8
  f_img = 2 * 1 * 2 * (16 + 16) + 4 * 1 * 4 * 2 + 2 * 1 * 2054 * 2 + 2 * 4
  f_ce = 2 * 2 * 4 * (16 + 16) + 4 * 2 * 16 * 2 + 2 * 2 * 2054 * 2 + 2 * 2 * 4
  assert bench_train.step_flops(1, 3, 1, 2, 1, 4) == 3 * (f_text + f_img + f_ce)


def test_unknown_size_is_an_error():
  with pytest.raises(ValueError, match="huge"):
    bench_train.run_benchmark(["huge"])
  r = subprocess.run([sys.executable, "-m", "rerank.bench_train", "--sizes=huge"], cwd=REPO,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2 and "huge" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: --sizes: unknown ['huge']")


def test_quick_run_times_step_and_input(tmp_path):
  # The documented command (README "Throughput"), one size and one timed step to stay fast.
  out = tmp_path / "bench.json"
  r = subprocess.run([sys.executable, "-m", "rerank.bench_train", "--quick", "--sizes=tiny",
                      "--iters=1", f"--out={out}"], cwd=REPO,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["quick"] and result["dtype"] == "float32" and result["peak_tflops"] > 0
  (row,) = result["rows"]
  assert (row["size"], row["batch"], row["text_len"], row["regions"]) == ("tiny", 8, 16, 8)
  assert row["pairs_per_step"] == 24 and row["iters"] == 1
  for key in ("step_ms", "input_ms", "fed_step_ms", "mfu"):
    assert np.isfinite(row[key]) and row[key] > 0, (key, row[key])
  assert row["pairs_per_s"] == pytest.approx(24 / row["step_ms"] * 1e3)
  assert "| tiny | 2.2 |" in r.stdout and "| input ms/batch | fed ms/step |" in r.stdout
  assert "input-bound)" in r.stdout  # the log line says which side limits training
