"""Orderings of candidates by score with a defined tie-break: top-k from a score matrix, the
reorder of a bi-encoder's top-k by cross-encoder scores (retrieve and rerank), the fusions of the
two scores, and first-hit ranks that storage order cannot improve.

Ties. Without relevance (search, indexes) equal scores go to the lower id: reproducible, but the
lower row wins every tie, so a corpus stored main split first would win its ties against
distractors. Evaluation therefore breaks ties AGAINST the relevant item (`loses_ties`,
`tie_ranks`, `settle_ties`): a non-relevant item with the same score ranks ahead of it, a
pessimistic rank that no storage order can improve. The optimistic rank (ties won) is returned
beside it so evaluation can count the queries whose hit depended on a tie.

Plain NumPy (`fuse` also takes `xp=jax.numpy` for the jitted reranker); nothing here knows a model.
"""

import numpy as np


def ranking_from_scores(scores: np.ndarray, k: int | None = None,
                        loses_ties: np.ndarray | None = None) -> np.ndarray:
  """Candidate ids per query in descending score order, ties to the lower id.

  Args:
    scores: [Q, N] higher is better.
    k: keep only the top k per query (None keeps all N).
    loses_ties: optional [Q, N] bool; among equal scores these candidates go after the others
      (evaluation passes the relevance matrix: ties broken against the relevant item).

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
  if loses_ties is not None:  # a full sort: score first, then the losers last, then the id
    order = np.lexsort((np.asarray(loses_ties, bool), neg), axis=1)
    return order[:, :k].astype(np.int64)
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


def rerank_topk(be_ranking: np.ndarray, ce_scores: np.ndarray,
                loses_ties: np.ndarray | None = None) -> np.ndarray:
  """Reorders the first k columns of a BE ranking by CE score (descending, ties keep BE order).

  Args:
    be_ranking: [Q, C] candidate ids, best first, C >= k.
    ce_scores: [Q, k] CE (or fused) scores of be_ranking[:, :k].
    loses_ties: optional [Q, k] bool; among equal scores these go after the others.
  Returns:
    [Q, C] the reranked top-k followed by be_ranking[:, k:].
  """
  k = ce_scores.shape[1]
  if be_ranking.shape[1] < k:
    raise ValueError(f"be_ranking has {be_ranking.shape[1]} columns, fewer than k={k}")
  if loses_ties is None:
    loses_ties = np.zeros(ce_scores.shape, bool)
  # Stable sort on -score (then the losers last): otherwise equal scores keep the BE order.
  order = np.lexsort((np.asarray(loses_ties, bool), -np.asarray(ce_scores)), axis=1)  # [Q, k]
  top = np.take_along_axis(be_ranking[:, :k], order, axis=1)
  return np.concatenate([top, be_ranking[:, k:]], axis=1)


# ------------------------------------------------------------------ ties against the relevant

def tie_ranks(scores: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """First-hit ranks of complete score lists, ties broken against / for the relevant items.

  Args:
    scores: [Q, C] every candidate's score (any order; -inf marks a missing candidate).
    relevant: [Q, C] bool.
  Returns:
    (pessimistic [Q], optimistic [Q]) 0-based ranks of the best relevant item: the items
    scoring above it, plus (pessimistic only) the non-relevant items tying with it. C where
    no candidate is relevant.
  """
  scores, relevant = np.asarray(scores), np.asarray(relevant, bool)
  best = np.where(relevant, scores, -np.inf).max(axis=1, initial=-np.inf, keepdims=True)  # [Q, 1]
  found = relevant.any(axis=1)
  above = (scores > best).sum(axis=1)
  tied = ((scores == best) & ~relevant).sum(axis=1)
  c = scores.shape[1]
  return np.where(found, above + tied, c), np.where(found, above, c)


def settle_ties(ids: np.ndarray, scores: np.ndarray, relevant: np.ndarray, row_scores,
                block_elems: int = 1 << 22):
  """A search's top-C, reordered so that ties go against the relevant items, with its ranks.

  Inside the list, tied items are reordered (relevant last). A row whose relevant item ties
  with the list's LAST score may have more tied items outside the list; such rows, and rows
  with no relevant item in the list (to know whether one tied just outside it), are settled
  on their full score rows: the first C of the pessimistic full order, and exact ranks.

  Args:
    ids: [Q, C] candidate ids, best first (-1 = missing, as approximate indexes return).
    scores: [Q, C] their scores.
    relevant: [Q, N] bool over the whole corpus.
    row_scores: fn(query rows [B]) -> [B, N] every candidate's score, computed as the index did.
    block_elems: full-row scores computed per block, at most this many values.
  Returns:
    (ids [Q, C], scores [Q, C], pessimistic [Q], optimistic [Q]): ranks as `tie_ranks`, C
    where the list holds no relevant item.
  """
  ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
  q, c = ids.shape
  n = relevant.shape[1]
  valid = ids >= 0
  rel = np.take_along_axis(relevant, np.maximum(ids, 0), axis=1) & valid  # [Q, C]
  scores = np.where(valid, scores, -np.inf)
  order = np.lexsort((rel, -scores), axis=1)  # [Q, C] score, then relevant last, then position
  take = lambda x: np.take_along_axis(x, order, axis=1)  # noqa: E731
  ids, scores, rel = take(ids), take(scores), take(rel)
  pess, opt = tie_ranks(scores, rel)
  if c >= n:  # the list is the whole corpus: nothing lies outside it
    return ids, scores, pess, opt
  missing = ~rel.any(axis=1)
  at_end = (rel & (scores == scores[:, -1:])).any(axis=1)
  rows = np.flatnonzero(missing | at_end)
  step = max(1, block_elems // n)
  for a in range(0, len(rows), step):
    r = rows[a:a + step]
    full = np.asarray(row_scores(r), np.float32)  # [B, N]
    p, o = tie_ranks(full, relevant[r])
    end = at_end[r]
    # A miss stays a miss (an approximate index may have missed the item, not tied it out);
    # it counts as tied only if the exact order also misses it.
    opt[r] = np.where(end | (p >= c), np.minimum(o, c), c)
    pess[r] = np.where(end, np.minimum(p, c), c)
    if end.any():
      e = r[end]
      top = ranking_from_scores(full[end], c, loses_ties=relevant[e])
      ids[e], scores[e] = top, np.take_along_axis(full[end], top, axis=1)
  return ids, scores, pess, opt


# ------------------------------------------------------------------ fusion of CE and BE scores

# The authors' fusion modes (their evaluator's names). "ce" is the older name of "standard".
FUSIONS = ("standard", "combination", "combination_normalized", "rank")
FUSION_ALIASES = {"ce": "standard"}


def canonical_fusion(fusion: str) -> str:
  """One of FUSIONS for a fusion name or alias; ValueError otherwise."""
  name = FUSION_ALIASES.get(fusion, fusion)
  if name not in FUSIONS:
    raise ValueError(f"fusion: expected one of {list(FUSIONS) + list(FUSION_ALIASES)}; "
                     f"found {fusion!r}")
  return name


def fuse(ce, be, fusion: str = "standard", weight: float = 0.0, valid=None, xp=np):
  """The score that orders a query's k reranked candidates (higher is better).

  - standard: the CE match logit alone.
  - combination: (1 - w) * CE + w * cosine.
  - combination_normalized: the same on scores min-max normalised per query over its
    (valid) candidates (a constant row normalises to 0).
  - rank: -((1 - w) * rank_CE + w * rank_BE), each rank the number of candidates scoring
    strictly higher (0 = best; tied candidates share a rank, so storage order plays no part).

  Args:
    ce, be: [Q, k] CE match logits and BE cosines of the same candidates.
    fusion: a name of FUSIONS (or an alias).
    weight: w in [0, 1], the cosine's share.
    valid: optional [Q, k] bool; padded candidates take no part in normalising or ranking.
    xp: numpy or jax.numpy (the jitted reranker).
  Returns:
    [Q, k] fused scores (float).
  """
  fusion = canonical_fusion(fusion)
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"fusion weight: expected a value in [0, 1]; found {weight}")
  if fusion == "standard":
    return ce
  if fusion == "combination":
    return (1.0 - weight) * ce + weight * be
  valid = xp.ones(ce.shape, bool) if valid is None else valid
  if fusion == "combination_normalized":
    return (1.0 - weight) * _min_max(ce, valid, xp) + weight * _min_max(be, valid, xp)
  return -((1.0 - weight) * _rank(ce, valid, xp) + weight * _rank(be, valid, xp))


def _min_max(x, valid, xp):
  """[Q, k] -> (x - min) / (max - min) per row over valid entries; 0 where max == min."""
  lo = xp.where(valid, x, xp.inf).min(axis=1, keepdims=True)
  hi = xp.where(valid, x, -xp.inf).max(axis=1, keepdims=True)
  span = hi - lo
  return xp.where(span > 0, (x - lo) / xp.where(span > 0, span, 1.0), 0.0)


def _rank(x, valid, xp):
  """[Q, k] -> per entry, how many valid entries of its row score strictly higher."""
  x = xp.where(valid, x, -xp.inf)
  return (x[:, None, :] > x[:, :, None]).sum(axis=-1).astype(xp.float32)  # [Q, i, j] -> [Q, i]
