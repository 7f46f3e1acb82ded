"""Retrieve and rerank in one jitted call: CE scores of a bi-encoder's top-k, reordered.

The final order inside the top-k is the CE score alone by default (the paper's cooperative
setting), or a fusion of CE and cosine (`rerank.indexing.ranking.fuse`: the authors'
"standard", "combination", "combination_normalized", "rank"; "ce" is "standard", and "mix" the
older alpha * P_CE + (1 - alpha) * cosine); items outside the top-k keep their BE order behind
the reranked ones. It reranks exactly k candidates, also for k < 10 (the authors' evaluator
reranks max(k, 10)).
`rerank.indexing.ranking.rerank_topk` is the NumPy reorder evaluation uses; `make_rerank_fn` /
`Reranker` score and reorder with static shapes (search CLI, `Retriever`, benchmark), applying
the model as the engine does (`engine.pair_logits`), or, for a family that caches its image
states with the index (BLIP), over the candidates' cached states (`image_cache.pair_logits`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from rerank.indexing import ranking
from rerank.inference import engine
from rerank.inference import image_cache


# ------------------------------------------------------------------ jitted rerank, static shapes

FUSIONS = ranking.FUSIONS + tuple(ranking.FUSION_ALIASES) + ("mix",)


def make_rerank_fn(model, fusion: str = "ce", alpha: float = 0.5, weight: float = 0.0,
                   from_states: bool = False):
  """ONE jitted function that scores [Q, k] (query, candidate) pairs and reorders them.

  Shapes are fixed by the caller (`Reranker` pads Q and k), so calls with the same k never
  recompile. Fusion: "ce" / "standard" orders by the CE match logit alone (the authors'
  default); "combination", "combination_normalized" and "rank" mix in the cosine with weight
  `weight` (`rerank.indexing.ranking.fuse`); "mix" by alpha * P_CE(match) + (1 - alpha) *
  cosine. Invalid (padded) candidates sort last and take no part in a fusion; equal scores
  keep BE order.

  The function: (params, token_ids [Q, k, L], text_mask [Q, k, L], regions [Q, k, R, F],
  region_mask [Q, k, R], cand_ids [Q, k], be_scores [Q, k], valid [Q, k]) ->
  {"ids", "score", "ce", "be"} each [Q, k], best first. With `from_states`, `regions` are the
  candidates' cached image states [Q, k, P+1, Dv] and `region_mask` is not read.
  """
  if fusion not in FUSIONS:
    raise ValueError(f"rerank fusion: expected one of {FUSIONS}; found {fusion!r}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"rerank alpha: expected a value in [0, 1]; found {alpha}")
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"rerank fusion weight: expected a value in [0, 1]; found {weight}")

  def rerank_fn(params, token_ids, text_mask, regions, region_mask, cand_ids, be_scores, valid):
    q, k = cand_ids.shape
    flat = lambda x: x.reshape((q * k,) + x.shape[2:])  # noqa: E731
    if from_states:
      logits = image_cache.pair_logits(model, params, flat(token_ids), flat(text_mask),
                                       flat(regions))
    else:
      logits = engine.pair_logits(model, params, flat(token_ids), flat(text_mask), flat(regions),
                                  flat(region_mask))
    logits = logits.reshape(q, k, 2)
    ce = logits[..., 1]  # [Q, k] match logit
    if fusion == "mix":
      score = alpha * jax.nn.softmax(logits, axis=-1)[..., 1] + (1.0 - alpha) * be_scores
    else:
      score = ranking.fuse(ce, be_scores, fusion, weight, valid, xp=jnp)
    score = jnp.where(valid, score, -jnp.inf)
    order = jnp.argsort(-score, axis=1, stable=True)  # stable: ties keep the BE order
    take = lambda x: jnp.take_along_axis(x, order, axis=1)  # noqa: E731
    return {"ids": take(cand_ids), "score": take(score), "ce": take(jnp.where(valid, ce, -jnp.inf)),
            "be": take(be_scores)}

  return jax.jit(rerank_fn)


class Reranker:
  """Host side of `make_rerank_fn`: pads queries to `query_block` and candidates to k.

  `pair_inputs(query_rows, cand_ids [B, k]) -> (token_ids, text_mask, regions, region_mask)`
  each [B, k, ...] builds the pair arrays for one block (the caller knows the direction); with
  `from_states`, regions are the candidates' cached image states (see `make_rerank_fn`).
  """

  def __init__(self, model, k: int, query_block: int = 8, fusion: str = "ce", alpha: float = 0.5,
               weight: float = 0.0, from_states: bool = False):
    if k < 1:
      raise ValueError(f"rerank k: expected >= 1; found {k}")
    self.k, self.query_block = k, query_block
    self.fn = make_rerank_fn(model, fusion, alpha, weight, from_states)

  def __call__(self, params, pair_inputs, be_ids: np.ndarray, be_scores: np.ndarray):
    """Reranks the first k columns of a BE ranking; the rest keep their BE order behind them.

    Args:
      params: CE parameters.
      pair_inputs: see the class docstring; called once per block of queries.
      be_ids: [Q, C] BE ranking (ids, best first); C may be smaller than k (a small corpus).
      be_scores: [Q, C] their cosines.
    Returns:
      dict of [Q, C] arrays "ids", "score" (the fused score; NaN behind the top k), "ce"
      (NaN behind the top k) and "be".
    """
    q, c = be_ids.shape
    kk, b = min(self.k, c), self.query_block
    out = {name: [] for name in ("ids", "score", "ce", "be")}
    for a in range(0, q, b):
      n = min(b, q - a)
      ids = np.zeros((b, self.k), np.int64)
      ids[:n, :kk] = be_ids[a:a + n, :kk]
      ids[n:, :kk] = be_ids[a:a + 1, :kk]  # padded queries repeat a real one (valid inputs)
      be = np.zeros((b, self.k), np.float32)
      be[:n, :kk] = be_scores[a:a + n, :kk]
      valid = np.zeros((b, self.k), bool)
      valid[:, :kk] = ids[:, :kk] >= 0  # an approximate index marks missing neighbours with -1
      rows = np.concatenate([np.arange(a, a + n), np.full(b - n, a)])
      # Padded or missing candidates repeat the first one (valid inputs); `valid` masks them out.
      cand = np.where(valid, ids, ids[:, :1])
      res = self.fn(params, *pair_inputs(rows, cand), ids, be, valid)
      for name in out:
        out[name].append(np.asarray(res[name])[:n, :kk])
    res = {name: np.concatenate(v) if v else np.zeros((0, kk)) for name, v in out.items()}
    tail = be_ids[:, kk:]
    nan_tail = np.full(tail.shape, np.nan, np.float32)
    return {"ids": np.concatenate([res["ids"].astype(be_ids.dtype), tail], 1),
            "score": np.concatenate([res["score"], nan_tail], 1),
            "ce": np.concatenate([res["ce"], nan_tail], 1),
            "be": np.concatenate([res["be"], be_scores[:, kk:]], 1)}
