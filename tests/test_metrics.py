"""Checks the retrieval metrics against hand-computed values and brute-force references."""

import numpy as np
import pytest

from rerank.evaluation import metrics
from rerank.indexing import ranking


def _first_hit_brute(ranking, relevant_sets):
  out = []
  for row, rel in zip(ranking, relevant_sets):
    pos = len(row)
    for p, cand in enumerate(row):
      if int(cand) in rel:
        pos = p
        break
    out.append(pos)
  return np.array(out)


def _ranking_brute(scores):
  # Sort key spelled out: higher score first, then lower candidate id.
  return np.array([sorted(range(len(row)), key=lambda n: (-row[n], n)) for row in scores])


def test_first_hit_hand_cases_sets_and_matrix():
  ranking = np.array([[3, 1, 4, 0],   # relevant {1, 4}: first hit at 1, the other one at 2
                      [2, 0, 1, 3],   # relevant {3}: last position
                      [0, 1, 2, 3],   # relevant {5}: not in this truncated list -> C = 4
                      [4, 2, 3, 1]])  # relevant {4, 2, 0}: top-1
  rel_sets = [{1, 4}, {3}, {5}, {4, 2, 0}]
  want = np.array([1, 3, 4, 0])
  np.testing.assert_array_equal(metrics.first_hit_ranks(ranking, rel_sets), want)
  # Same with arrays instead of sets.
  rel_arrays = [np.array(sorted(s)) for s in rel_sets]
  np.testing.assert_array_equal(metrics.first_hit_ranks(ranking, rel_arrays), want)
  # Bool matrix over a corpus of 6 candidates (larger than C = 4).
  mat = np.zeros((4, 6), bool)
  for q, s in enumerate(rel_sets):
    mat[q, list(s)] = True
  np.testing.assert_array_equal(metrics.first_hit_ranks(ranking, mat), want)


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_first_hit_random_vs_brute(seed):
  rng = np.random.default_rng(seed)
  q, n, c = 20, 30, 7
  ranking = np.stack([rng.permutation(n)[:c] for _ in range(q)])
  mat = rng.random((q, n)) < 0.1  # some rows have several relevant ids, some none
  rel_sets = [set(np.flatnonzero(r).tolist()) for r in mat]
  want = _first_hit_brute(ranking, rel_sets)
  assert (want == c).any() and (want < c).any()
  np.testing.assert_array_equal(metrics.first_hit_ranks(ranking, mat), want)
  np.testing.assert_array_equal(metrics.first_hit_ranks(ranking, rel_sets), want)


def test_recall_hand_computed_percent():
  ranks = np.array([0, 4, 12])
  r = metrics.recall_at_k(ranks)
  assert list(r) == ["R@1", "R@5", "R@10"]
  np.testing.assert_allclose(r["R@1"], 33.333333, atol=1e-4)
  np.testing.assert_allclose(r["R@5"], 66.666667, atol=1e-4)
  np.testing.assert_allclose(r["R@10"], 66.666667, atol=1e-4)
  # Boundary: rank k-1 is a hit at k, rank k is not.
  assert metrics.recall_at_k(np.array([4, 5]), ks=(5, 6)) == {"R@5": 50.0, "R@6": 100.0}


def test_mrr_hand_computed():
  # 1/1 + 1/5 + 0 (rank 12 is beyond k=10) + 1/10, over 4 queries.
  ranks = np.array([0, 4, 12, 9])
  np.testing.assert_allclose(metrics.mrr_at_k(ranks, k=10), 100 * (1 + 0.2 + 0.1) / 4)
  np.testing.assert_allclose(metrics.mrr_at_k(ranks, k=5), 100 * (1 + 0.2) / 4)


def test_ranking_tie_break_hand_case():
  scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1],
                     [1.0, 1.0, 1.0, 1.0, 1.0],
                     [0.0, 2.0, 3.0, 2.0, 3.0]])
  want = np.array([[1, 3, 0, 2, 4],
                   [0, 1, 2, 3, 4],
                   [2, 4, 1, 3, 0]])
  np.testing.assert_array_equal(ranking.ranking_from_scores(scores), want)
  # Truncation cuts through tie groups; the lower ids must win.
  np.testing.assert_array_equal(ranking.ranking_from_scores(scores, k=3), want[:, :3])
  np.testing.assert_array_equal(ranking.ranking_from_scores(scores, k=1), want[:, :1])


@pytest.mark.parametrize("seed", (0, 1, 2, 3))
@pytest.mark.parametrize("dtype", (np.int64, np.float32, np.uint8, np.bool_))
def test_ranking_topk_equals_full_prefix(seed, dtype):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 5, size=(16, 40)).astype(dtype)  # many ties
  full = ranking.ranking_from_scores(scores)
  np.testing.assert_array_equal(full, _ranking_brute(scores.astype(np.int64)))
  for k in (1, 2, 5, 13, 39, 40, 100):
    got = ranking.ranking_from_scores(scores, k=k)
    assert got.shape == (16, min(k, 40))
    np.testing.assert_array_equal(got, full[:, :k], err_msg=f"k={k}")


@pytest.mark.parametrize("seed", (0, 1))
def test_ranking_topk_mixed_tied_and_distinct_rows(seed):
  # Rows of distinct floats take the argpartition fast path, tied rows the by-id repair path;
  # both in one call must still agree with the full stable sort.
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(12, 50))
  scores[::2] = rng.integers(0, 3, size=(6, 50))
  full = ranking.ranking_from_scores(scores)
  np.testing.assert_array_equal(full, _ranking_brute(scores))
  for k in (1, 3, 10, 49):
    np.testing.assert_array_equal(ranking.ranking_from_scores(scores, k=k), full[:, :k])


def test_ranking_with_nan_matches_full_sort():
  scores = np.array([[0.2, np.nan, 0.9, 0.2], [np.nan, np.nan, 0.1, 0.3]])
  full = ranking.ranking_from_scores(scores)
  np.testing.assert_array_equal(full, [[2, 0, 3, 1], [3, 2, 0, 1]])
  np.testing.assert_array_equal(ranking.ranking_from_scores(scores, k=3), full[:, :3])


def test_end_to_end_scores_to_recall():
  # 3 text queries over 4 images; query 2 ties its relevant image with a lower id.
  scores = np.array([[0.9, 0.1, 0.2, 0.3],
                     [0.1, 0.2, 0.8, 0.9],
                     [0.5, 0.5, 0.1, 0.0]])
  relevant = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]], bool)
  ranks = metrics.first_hit_ranks(ranking.ranking_from_scores(scores, k=2), relevant)
  np.testing.assert_array_equal(ranks, [0, 1, 1])
  r = metrics.recall_at_k(ranks, ks=(1, 2))
  np.testing.assert_allclose([r["R@1"], r["R@2"]], [100 / 3, 100.0])


def test_summarise():
  t2i = {"R@1": 40.0, "R@5": 70.0, "R@10": 80.0}
  i2t = {"R@1": 50.0, "R@5": 80.0, "R@10": 90.0}
  s = metrics.summarise(t2i, i2t)
  assert s["t2i"] == t2i and s["i2t"] == i2t
  np.testing.assert_allclose(s["rsum"], 410.0)
  np.testing.assert_allclose(s["mR"], 410.0 / 6)
