"""How many ScaNN leaves to search for a target recall, measured at build time.

ScaNN's speed/recall knob is the number of partitions (leaves) a query visits. A fixed fraction
of the leaves is too many for tightly clustered corpora and too few for diffuse ones, so
`indexes.build` (with `config.index.target_recall` > 0) measures it instead: recall@k of the
ScaNN top-k against the exact top-k on held-out queries, for the fewest leaves that reach the
target (a bisection over 1..num_leaves, recall growing with the leaves searched). Arrays only:
the caller supplies the search and the exact answers (`indexes.ScannIndex.build`).

Held-out queries are real queries when the caller has them (`rerank.index` embeds a sample of
the split's captions), else a leave-one-out sample of the corpus itself: a corpus row as the
query, its own row removed from both the exact and the ScaNN answers.
"""

from typing import Callable

import numpy as np


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean over queries of |found ∩ truth| / k; found [Q, >=k] ids (-1 = a miss), truth [Q, k]."""
  k = truth.shape[1]
  if not len(truth) or not k:
    raise ValueError(f"recall_at_k: expected [Q, k] true ids with Q, k >= 1; found {truth.shape}")
  hits = [len(set(f[:k].tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
  return float(np.sum(hits) / truth.size)


def sample_rows(n: int, num: int, seed: int = 0) -> np.ndarray:
  """[min(num, n)] distinct corpus rows, sorted: the leave-one-out queries."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
  return np.sort(rng.choice(n, min(num, n), replace=False))


def without_rows(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
  """[Q, k+1] ids -> [Q, k]: each query's own row removed (else its last id dropped)."""
  out = np.empty((len(ids), k), ids.dtype)
  for q, (row, o) in enumerate(zip(ids, own)):
    out[q] = row[row != o][:k] if (row == o).any() else row[:k]
  return out


def choose_leaves(recall_for: Callable[[int], float], num_leaves: int, target: float) -> dict:
  """The fewest leaves to search whose measured recall reaches `target`.

  Args:
    recall_for: leaves to search -> measured recall@k on the calibration queries.
    num_leaves: leaves of the tree (the most that can be searched).
    target: the recall to reach, in (0, 1].
  Returns:
    {"leaves_to_search", "recall" (measured at that count), "met" (False when even every leaf
    stays below the target: then all leaves are searched), "tried": [[leaves, recall], ...]}.
  """
  if not 0 < target <= 1:
    raise ValueError(f"index.target_recall: expected a recall in (0, 1]; found {target}")
  tried = {}

  def measure(leaves):
    if leaves not in tried:
      tried[leaves] = recall_for(leaves)
    return tried[leaves]

  lo, hi = 1, num_leaves
  met = measure(hi) >= target
  while met and lo < hi:  # invariant: measure(hi) >= target
    mid = (lo + hi) // 2
    if measure(mid) >= target:
      hi = mid
    else:
      lo = mid + 1
  return {"leaves_to_search": hi, "recall": tried[hi], "met": bool(met),
          "tried": [[leaves, tried[leaves]] for leaves in sorted(tried)]}
