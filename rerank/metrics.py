"""Retrieval metrics: Recall@k, MRR@k and their summaries, computed from rankings.

Every retrieval mode (BE alone, CE alone, retrieve-and-rerank) ends as the same thing: per
query, candidate ids ordered best first, possibly truncated (RR only reorders the BE top-k).
Reducing each query to the position of its first relevant candidate makes all metrics one-liners
and treats "relevant item outside the truncated list" uniformly as a miss.

Tie-break convention: equal scores are ordered by lower candidate index first, everywhere, so
that BE, CE and RR numbers are reproducible and comparable across runs and hardware.

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


def mrr_at_k(first_hit_ranks: np.ndarray, k: int = 10) -> float:
  """Mean reciprocal rank of the first hit, counting hits beyond position k as 0, in percent."""
  ranks = np.asarray(first_hit_ranks)  # [Q]
  rr = np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0)  # [Q]
  return float(100.0 * np.mean(rr))


def ranking_from_scores(scores: np.ndarray, k: int | None = None) -> np.ndarray:
  """Candidate ids per query in descending score order, ties to the lower id.

  Args:
    scores: [Q, N] higher is better.
    k: keep only the top k per query (None keeps all N).

  Returns:
    [Q, k] (or [Q, N]) int64; always equal to the prefix of the full stable descending sort.
  """
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [Q, N]; got shape {scores.shape}")
  if scores.dtype == bool or np.issubdtype(scores.dtype, np.unsignedinteger):
    scores = scores.astype(np.int64)  # negating these would flip or wrap around
  neg = -scores  # [Q, N]; ascending order of neg == descending order of scores
  n = scores.shape[1]
  # argpartition cannot order NaNs the way the full sort does (last), so take the slow path.
  if k is None or k >= n or (np.issubdtype(neg.dtype, np.floating) and np.isnan(neg).any()):
    return np.argsort(neg, axis=1, kind="stable")[:, :k].astype(np.int64)
  if k <= 0:
    return np.zeros((scores.shape[0], 0), dtype=np.int64)

  # The k-th best value per row. argpartition picks arbitrary members of a tie at the boundary,
  # so its choice is trusted only in rows where that boundary tie does not straddle position k.
  top = np.argpartition(neg, k - 1, axis=1)[:, :k]  # [Q, k] unordered
  thresh = np.take_along_axis(neg, top, axis=1).max(axis=1, keepdims=True)  # [Q, 1]
  straddle = np.flatnonzero((neg <= thresh).sum(axis=1) > k)  # [S] rows to redo by id
  if straddle.size:
    sub, sub_thresh = neg[straddle], thresh[straddle]  # [S, N], [S, 1]
    better = sub < sub_thresh  # fewer than k per row
    tied = sub == sub_thresh
    n_free = k - better.sum(axis=1, keepdims=True)  # [S, 1] places left for the tie
    # Of the boundary ties, keep the lowest ids: exactly what the stable full sort would keep.
    keep = better | (tied & (np.cumsum(tied, axis=1) <= n_free))  # [S, N], k per row
    top[straddle] = np.nonzero(keep)[1].reshape(straddle.size, k)
  # Ids ascending first, so the stable sort by score leaves the lower id first among equals.
  top = np.sort(top, axis=1)  # [Q, k]
  order = np.argsort(np.take_along_axis(neg, top, axis=1), axis=1, kind="stable")  # [Q, k]
  return np.take_along_axis(top, order, axis=1).astype(np.int64)


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
