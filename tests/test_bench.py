"""rerank.bench end to end on tiny sizes: the JSON holds every row, flags extrapolation, and
its ScaNN recall is computed against exact search (content checked, never timings)."""

import json
import os
import subprocess
import sys

import numpy as np

from rerank import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_clustered_embeddings_are_unit_and_clustered():
  x = bench.clustered_embeddings(2000, 16, seed=0)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
  sims = x[:200] @ x.T
  np.fill_diagonal(sims[:, :200], -1)
  # Nearest neighbours are much closer than random pairs would be (i.i.d. would give ~0).
  assert np.median(sims.max(axis=1)) > 0.5 and abs(np.median(sims)) < 0.2


def test_bench_cli_writes_table_json_and_plot(tmp_path):
  out = tmp_path / "bench"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run(
      [sys.executable, "-m", "rerank.bench", f"--out={out}", "--sizes=300,2000", "--k=5",
       "--queries=20", "--ce_max=400"], env=env, cwd=REPO, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-2000:]
  with open(out / "bench.json") as f:
    result = json.load(f)
  rows = {(r["N"], r["method"]): r for r in result["rows"]}
  assert set(rows) == {(n, m) for n in (300, 2000) for m in ("BE", "RR", "CE-k", "CE")}
  assert all(r["seconds_per_query"] > 0 for r in rows.values())
  # CE-full is measured up to --ce_max and extrapolated linearly (and flagged) beyond it.
  assert rows[(300, "CE")]["measured"] and not rows[(2000, "CE")]["measured"]
  np.testing.assert_allclose(rows[(2000, "CE")]["seconds_per_query"],
                             2000 * result["ce_seconds_per_pair"], rtol=1e-9)
  assert rows[(300, "BE")]["measured"] and rows[(300, "BE")]["index"] == "exact"
  # RR = BE + the k CE pairs, by construction of the timing.
  for n in (300, 2000):
    np.testing.assert_allclose(rows[(n, "RR")]["seconds_per_query"],
                               rows[(n, "BE")]["seconds_per_query"]
                               + rows[(n, "CE-k")]["seconds_per_query"], rtol=1e-9)
  index_rows = result["index_rows"]  # ScaNN only from 1000 items
  assert {r["N"] for r in index_rows} == {2000} and [r["default"] for r in index_rows][0]
  leaves = [r["leaves_to_search"] for r in index_rows]
  assert leaves == sorted(leaves, reverse=True) and len(leaves) >= 2
  for r in index_rows:
    assert 0.3 <= r["recall_at_k"] <= 1.0 and r["scann_seconds"] > 0 and r["exact_seconds"] > 0
  # Searching 4x the leaves of the same index finds (up to reorder effects) no fewer neighbours.
  assert index_rows[0]["recall_at_k"] >= index_rows[-1]["recall_at_k"] - 0.05
  table = (out / "bench.md").read_text()
  assert "| 2000 |" in table and "*" in table  # the extrapolated CE is starred
  png = (out / "bench.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp files left


def test_bench_cli_rejects_bad_sizes(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-m", "rerank.bench", f"--out={tmp_path}", "--sizes=10,abc"],
                       env=env, cwd=REPO, capture_output=True, text=True)
  assert res.returncode != 0 and "error: --sizes" in res.stderr
