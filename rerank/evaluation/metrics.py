"""Retrieval metrics: Recall@k, MRR@k and their summaries, computed from rankings.

Every retrieval mode (BE alone, CE alone, retrieve-and-rerank) ends as the same thing: per
query, candidate ids ordered best first, possibly truncated (RR only reorders the BE top-k).
Reducing each query to the position of its first relevant candidate makes all metrics one-liners
and treats "relevant item outside the truncated list" uniformly as a miss.

Tie-break convention: evaluation breaks ties AGAINST the relevant item (a non-relevant item with
the same score ranks ahead of it; `rerank.indexing.ranking.tie_ranks` / `settle_ties`), so no
storage order of the corpus can improve a score. `tied_hits` counts the queries whose hit at
R@k depended on that rule (it would be a hit had the ties gone the other way). Rankings made
without relevance (search, indexes) put the lower candidate index first.

NumPy only; this runs on host after scores are gathered, never under jit.
"""

from typing import Iterable, Mapping, Sequence

import numpy as np


def first_hit_ranks(ranking: np.ndarray,
                    relevant: np.ndarray | Sequence[Iterable[int]]) -> np.ndarray:
  """0-based position of the first relevant candidate in each ranked list.

  Args:
    ranking: [Q, C] int candidate ids, best first. C may be shorter than the corpus.
    relevant: either a bool matrix [Q, N] (relevant[q, n] is True if candidate n answers query
      q), or a length-Q sequence of sets / arrays of relevant candidate ids.

  Returns:
    [Q] int64; C where no relevant candidate appears in the list (a miss at every k <= C).
  """
  ranking = np.asarray(ranking)
  if ranking.ndim != 2:
    raise ValueError(f"ranking must be [Q, C]; got shape {ranking.shape}")
  q, c = ranking.shape
  if isinstance(relevant, np.ndarray) and relevant.dtype == bool:
    if relevant.ndim != 2 or relevant.shape[0] != q:
      raise ValueError(f"relevant matrix must be [{q}, N]; got shape {relevant.shape}")
    hits = np.take_along_axis(relevant, ranking.astype(np.int64), axis=1)  # [Q, C]
  else:
    if len(relevant) != q:
      raise ValueError(f"relevant has {len(relevant)} entries for {q} ranked queries")
    hits = np.zeros((q, c), dtype=bool)  # [Q, C]
    for row, rel in enumerate(relevant):
      rel = np.atleast_1d(np.asarray(list(rel) if isinstance(rel, (set, frozenset)) else rel))
      hits[row] = np.isin(ranking[row], rel)
  found = hits.any(axis=1)  # [Q]
  # argmax of a bool row is its first True; rows without a True would wrongly read 0.
  return np.where(found, hits.argmax(axis=1), c).astype(np.int64)


def recall_at_k(first_hit_ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k in percent: share of queries with a relevant candidate in the top k.

  Args:
    first_hit_ranks: [Q] output of `first_hit_ranks`.
    ks: cut-offs.

  Returns:
    {"R@k": percent} for each k in `ks`.
  """
  ranks = np.asarray(first_hit_ranks)  # [Q]
  return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def tied_hits(pessimistic: np.ndarray, optimistic: np.ndarray,
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, int]:
  """Queries that miss at R@k only because a tie went against their relevant item.

  Args:
    pessimistic: [Q] first-hit ranks with ties broken against the relevant item (the recall).
    optimistic: [Q] the same with ties broken for it.
  Returns:
    {"R@k": count of queries with optimistic < k <= pessimistic} for each k in `ks`.
  """
  pess, opt = np.asarray(pessimistic), np.asarray(optimistic)
  return {f"R@{k}": int(np.sum((opt < k) & (pess >= k))) for k in ks}


def mrr_at_k(first_hit_ranks: np.ndarray, k: int = 10) -> float:
  """Mean reciprocal rank of the first hit, counting hits beyond position k as 0, in percent."""
  ranks = np.asarray(first_hit_ranks)  # [Q]
  rr = np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0)  # [Q]
  return float(100.0 * np.mean(rr))


def summarise(t2i: Mapping[str, float], i2t: Mapping[str, float]) -> dict:
  """Bundles both directions with the paper's aggregate numbers.

  Args:
    t2i: text->image recalls, with at least "R@1", "R@5", "R@10" in percent.
    i2t: image->text recalls, same keys.

  Returns:
    {"t2i": t2i, "i2t": i2t, "mR": mean of the six R@{1,5,10}, "rsum": their sum}.
  """
  six = [float(d[f"R@{k}"]) for d in (t2i, i2t) for k in (1, 5, 10)]
  return {"t2i": dict(t2i), "i2t": dict(i2t), "mR": sum(six) / 6.0, "rsum": sum(six)}
