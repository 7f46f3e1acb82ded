"""rerank.bench end to end on tiny sizes: the JSON holds every row, flags extrapolation, and
its ScaNN recall is computed against exact search; the paper's Tables 3 and 4 sit beside the
published figures (content checked, never timings). The arithmetic that turns timed parts into
rows and table cells is checked with stand-ins whose costs are known, against sums written out
here."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from rerank import bench
from rerank.evaluation import paper_costs
from rerank.evaluation import paper_numbers

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
       "--queries=20", "--ce_max=400", "--paper_budget=0"], env=env, cwd=REPO,
      capture_output=True, text=True)
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
  # The paper's Tables 3 and 4 from the same run, beside its figures. Budget 0: every batched
  # workload larger than one batch (here all but the single query's) is extrapolated.
  paper = result["paper"]
  assert (paper["model"], paper["k"], paper["text_len"], paper["regions"]) == ("tiny", 5, 72, 50)
  cells = {(r["table"], r["method"]): r for r in paper["rows"]}
  assert set(cells) == {(t, m) for t in ("3", "4") for m in ("BE", "RR", "CE")}
  for (number, method), r in cells.items():
    published = {"3": paper_numbers.LATENCY_50K, "4": paper_numbers.EVAL_COCO5K}[number][method]
    assert r["paper_seconds"] == published.value and r["seconds"] > 0
    assert r["measured"] == ((number, method) in (("3", "BE"), ("3", "RR"))), r
  parts = {name: p["seconds"] for name, p in paper["parts"].items()}
  np.testing.assert_allclose(cells[("3", "RR")]["seconds"], cells[("3", "BE")]["seconds"]
                             + parts["rerank 5 pairs"], rtol=1e-9)
  np.testing.assert_allclose(cells[("4", "RR")]["seconds"], cells[("4", "BE")]["seconds"]
                             + parts["150000 RR pairs"], rtol=1e-9)
  assert "| 3 | latency per query, 50000 images | RR |" in table
  assert "| 4 | evaluate MSCOCO 5k test (25000 x 5000) | CE |" in table and "| 50.0 h |" in table
  png = (out / "bench.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp files left


def test_bench_cli_rejects_bad_sizes(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-m", "rerank.bench", f"--out={tmp_path}", "--sizes=10,abc"],
                       env=env, cwd=REPO, capture_output=True, text=True)
  assert res.returncode != 0 and "error: --sizes" in res.stderr


class _Clock:
  """A fake perf_counter: each call of the timed function advances it by its cost."""

  def __init__(self):
    self.now, self.calls = 0.0, []

  def __call__(self):
    return self.now

  def run(self, n, compile_seconds=10.0, per_item=0.5):
    self.now += n * per_item + (compile_seconds if not self.calls else 0.0)
    self.calls.append(n)


def test_timings_leave_out_the_compiling_call(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(paper_costs.time, "perf_counter", clock)
  # One untimed call (it compiles), then the median of the steady ones.
  assert paper_costs.timed(lambda: clock.run(1), repeats=3) == 0.5
  assert clock.calls == [1, 1, 1, 1]


# 10 items in batches of 4; `run` costs 0.5 s an item (plus 10 s the first, compiling call).
# A batch takes 2 s, so the estimate is ceil(10 / 4) = 3 padded batches, 6 s: within a budget of
# 100 s the whole is run once (5 s), beyond it the estimate stands, marked extrapolated.
@pytest.mark.parametrize("budget, want, calls", [
    (0.0, paper_costs.Cell(6.0, False), [4, 4, 4]),
    (100.0, paper_costs.Cell(5.0, True), [4, 4, 4, 10])])
def test_workloads_run_in_full_within_budget_else_scale_a_batch(monkeypatch, budget, want, calls):
  clock = _Clock()
  monkeypatch.setattr(paper_costs.time, "perf_counter", clock)
  per_batch = paper_costs.timed(lambda: clock.run(4), 2)
  assert per_batch == 2.0
  assert paper_costs._workload(clock.run, 10, 4, per_batch, budget) == want
  assert clock.calls == calls
  assert paper_costs._workload(clock.run, 3, 4, per_batch, budget) == paper_costs.Cell(2.0, True)


# ------------------------------------------------------------------ the bench's arithmetic

# Known costs (seconds) of the timed pieces; the expected rows below are computed from them.
ENCODE, SEARCH_PER_QUERY, RERANK, PAIRS_FIXED, PER_PAIR = 0.0031, 0.0005, 0.02, 0.1, 0.001


def _fake_bench(monkeypatch, clock):
  """bench.run's model and exact index replaced by stand-ins that advance `clock` by known costs."""

  class Model:
    def __init__(self, size, k, pair_batch=256):
      del size, pair_batch
      self.config = ml_collections.ConfigDict(dict(model=dict(hidden_size=8)))
      self.k = k

    def encode_one(self):
      clock.now += ENCODE

    def ce_pairs(self, n):
      clock.now += PAIRS_FIXED + n * PER_PAIR

    def rerank_one(self, ids, scores):
      assert ids.shape == scores.shape == (1, self.k)
      clock.now += RERANK

  class Exact(bench.index_lib.ExactIndex):
    def search(self, queries, k):
      clock.now += SEARCH_PER_QUERY * len(queries)
      return super().search(queries, k)

  monkeypatch.setattr(bench, "_Model", Model)
  monkeypatch.setattr(bench.index_lib, "ExactIndex", Exact)
  monkeypatch.setattr(paper_costs.time, "perf_counter", clock)


def test_bench_rows_are_the_sums_of_their_timed_parts(monkeypatch, tmp_path):
  clock = _Clock()
  _fake_bench(monkeypatch, clock)
  res = bench.run(str(tmp_path), [50, 300], "tiny", k=5, queries=20, ce_max=100, seed=0,
                  log=lambda *_, **__: None, paper_budget=None)
  got = {(r["N"], r["method"]): (r["seconds_per_query"], r["measured"]) for r in res["rows"]}
  # Written out from the costs: CE is measured at 50 and 100 pairs (--ce_max); 300 pairs are
  # 300 x the per-pair cost of the largest measured run, flagged as extrapolated.
  be, per_pair = ENCODE + SEARCH_PER_QUERY, (PAIRS_FIXED + 100 * PER_PAIR) / 100
  want = {}
  for n in (50, 300):
    want.update({(n, "BE"): (be, True), (n, "RR"): (be + RERANK, True),
                 (n, "CE-k"): (RERANK, True)})
  want[(50, "CE")] = (PAIRS_FIXED + 50 * PER_PAIR, True)
  want[(300, "CE")] = (300 * per_pair, False)
  assert set(got) == set(want)
  for key, (seconds, measured) in want.items():
    assert got[key] == (pytest.approx(seconds, rel=1e-9), measured), key
  assert res["encode_seconds"] == pytest.approx(ENCODE)
  assert res["ce_seconds_per_pair"] == pytest.approx(per_pair)
  assert res["index_rows"] == []  # no ScaNN below 1000 items
  # The table's ratios, from the same costs.
  table = (tmp_path / "bench.md").read_text()
  rr = be + RERANK
  assert (f"| 300 | {be:.2e} | {rr:.2e} | {RERANK:.2e} | {300 * per_pair:.2e}* "
          f"| {rr / RERANK:.2f} | {300 * per_pair / rr:.1f} | 60 |") in table


# Per-item costs of the paper tables' work: texts, images and pairs (batched), one query's
# encoding, a rerank of k pairs, and an exact search per (query, item) score.
TEXT, IMAGE, PAIR, QUERY, RERANK_K, PER_SCORE = 2e-4, 3e-4, 1e-3, 0.004, 0.03, 1e-9


@pytest.mark.parametrize("budget", [0.0, 1e12])
def test_paper_tables_are_the_sums_of_their_timed_parts(monkeypatch, budget):
  clock = _Clock()

  class Work:
    def __init__(self, model, mode, params, vocab, batch, k, seed):
      del model, mode, params, vocab, batch, k, seed

    def texts(self, n):
      clock.now += n * TEXT

    def images(self, n):
      clock.now += n * IMAGE

    def pairs(self, n):
      clock.now += n * PAIR

    def query(self):
      clock.now += QUERY

    def rerank(self, ids, scores):
      clock.now += RERANK_K

  class Exact:
    def __init__(self, corpus):
      self.n = len(corpus)

    def search(self, queries, k):
      clock.now += PER_SCORE * len(queries) * self.n
      return np.zeros((len(queries), k), np.int64), np.zeros((len(queries), k), np.float32)

  monkeypatch.setattr(paper_costs, "_Work", Work)
  monkeypatch.setattr(paper_costs.index_lib, "ExactIndex", Exact)
  monkeypatch.setattr(paper_costs.time, "perf_counter", clock)
  model = ml_collections.ConfigDict(dict(cfg=dict(hidden_size=4)))
  batch, k = 256, 5
  res = paper_costs.measure(model, "joint_alternate", None, 50, k, batch, budget,
                            log=lambda *_, **__: None)

  # Written out: a workload over one batch is scaled from one timed batch (ceil(n / batch)
  # padded batches) unless the budget lets it run in full.
  def work(n, per_item):
    full = budget >= per_item * batch * -(-n // batch)
    return (n * per_item if full else per_item * batch * -(-n // batch)), full

  be3 = QUERY + PER_SCORE * 50_000
  want3 = {"BE": (be3, True), "RR": (be3 + RERANK_K, True), "CE": work(50_000, PAIR)}
  texts, images = work(25_000, TEXT), work(5_000, IMAGE)
  search_both = 2 * PER_SCORE * 25_000 * 5_000
  be4 = (texts[0] + images[0] + search_both, texts[1] and images[1])
  rr_pairs = work(30_000 * k, PAIR)
  want4 = {"BE": be4, "RR": (be4[0] + rr_pairs[0], be4[1] and rr_pairs[1]),
           "CE": work(25_000 * 5_000, PAIR)}
  for table, want in (("latency_50k", want3), ("eval_coco5k", want4)):
    for method, (seconds, measured) in want.items():
      cell = res[table][method]
      assert (cell.seconds, cell.measured) == (pytest.approx(seconds, rel=1e-9), measured), (
          table, method)
  scaled = [cell.measured for t in ("latency_50k", "eval_coco5k") for cell in res[t].values()]
  assert scaled == ([True, True, False, False, False, False] if budget == 0 else [True] * 6)
