"""Retrieve and rerank: reorder a bi-encoder's top-k by cross-encoder scores.

The final order inside the top-k is the CE score alone (the paper's cooperative setting);
items outside the top-k keep their BE order behind the reranked ones.
"""

import numpy as np


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

