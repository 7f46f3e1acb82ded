"""The training benchmark's size table and its FLOP count (the run itself is a GPU-side command)."""

import os
import subprocess
import sys

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
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
  assert r.returncode == 2 and "huge" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: --sizes: unknown ['huge']")
