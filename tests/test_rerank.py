"""Retrieve-and-rerank order: CE order inside the top-k, BE order behind it."""

import numpy as np
import pytest

from rerank.indexing import ranking


def test_topk_follows_ce_order_and_tail_keeps_be_order():
  rng = np.random.default_rng(0)
  be = np.stack([rng.permutation(30) for _ in range(6)])  # [Q, C]
  k = 8
  ce = rng.normal(size=(6, k))
  out = ranking.rerank_topk(be, ce)
  for q in range(6):
    # Brute force: sort the k candidates by their CE score, highest first.
    want = [c for _, c in sorted(zip(-ce[q], be[q, :k]))]
    assert out[q, :k].tolist() == want
    assert out[q, k:].tolist() == be[q, k:].tolist()
    assert sorted(out[q].tolist()) == sorted(be[q].tolist())


def test_ties_keep_be_order():
  be = np.array([[5, 3, 9, 1]])
  out = ranking.rerank_topk(be, np.array([[1.0, 2.0, 1.0]]))
  assert out.tolist() == [[3, 5, 9, 1]]


def test_k_larger_than_ranking_is_an_error():
  with pytest.raises(ValueError, match="fewer than k"):
    ranking.rerank_topk(np.zeros((1, 3), int), np.zeros((1, 4)))
