"""Orderings of candidates by score with a defined tie-break: top-k from a score matrix, and the
reorder of a bi-encoder's top-k by cross-encoder scores (retrieve and rerank).

Plain NumPy; nothing here knows a model.
"""

import numpy as np


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


def rerank_topk(be_ranking: np.ndarray, ce_scores: np.ndarray) -> np.ndarray:
  """Reorders the first k columns of a BE ranking by CE score (descending, ties keep BE order).

  Args:
    be_ranking: [Q, C] candidate ids, best first, C >= k.
    ce_scores: [Q, k] CE scores of be_ranking[:, :k].
  Returns:
    [Q, C] the reranked top-k followed by be_ranking[:, k:].
  """
  k = ce_scores.shape[1]
  if be_ranking.shape[1] < k:
    raise ValueError(f"be_ranking has {be_ranking.shape[1]} columns, fewer than k={k}")
  # Stable sort on -score: equal CE scores keep the BE order.
  order = np.argsort(-ce_scores, axis=1, kind="stable")  # [Q, k]
  top = np.take_along_axis(be_ranking[:, :k], order, axis=1)
  return np.concatenate([top, be_ranking[:, k:]], axis=1)
