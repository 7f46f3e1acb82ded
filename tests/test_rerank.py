"""Retrieve-and-rerank order: CE order inside the top-k, BE order behind it; the jitted
reranker's fusions and the search config that chooses them."""

import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from rerank.data import batches
from rerank.indexing import ranking
from rerank.inference import reranker
from rerank.inference import retriever
from rerank.models import modes

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402


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


# ------------------------------------------------------------------ "mix" and the search config

class _LogitModel:
  """Stands in for the model in `reranker.make_rerank_fn`: a pair's CE logits are [0, x], x
  the pair's first region value, so P(match) = sigmoid(x)."""

  def score_pairs(self):  # only named: `engine.pair_logits` passes it as `method`
    raise NotImplementedError

  def apply(self, variables, token_ids, text_mask, regions, region_mask, method=None):
    assert method == self.score_pairs
    x = regions[:, 0, 0]  # [B]
    return jnp.stack([jnp.zeros_like(x), x], axis=-1)  # [B, 2]


# Candidates 0, 1, 2 of one query. BE order 0, 1, 2; CE order 2, 1, 0 (P = .0025, .8, .9975).
# alpha * P + (1 - alpha) * cosine puts 1 first for alpha = .3 (0 then 2); swapping alpha and
# 1 - alpha would give 1, 2, 0; alpha 0 the BE order, alpha 1 the CE order.
MIX_LOGITS = np.array([-6.0, np.log(4.0), 6.0], np.float32)
MIX_COSINES = np.array([[1.0, 0.8, 0.0]], np.float32)


def _mix_pairs(rows, cand):
  """pair_inputs of `reranker.Reranker`: [B, k, ...] arrays whose region 0 holds the logit."""
  b, k = cand.shape
  regions = MIX_LOGITS[cand][:, :, None, None]  # [B, k, 1, 1]
  return (np.zeros((b, k, 2), np.int32), np.ones((b, k, 2), bool), regions,
          np.ones((b, k, 1), bool))


@pytest.mark.parametrize("fusion, alpha, want", [
    ("mix", 0.3, [1, 0, 2]),
    ("mix", 0.0, [0, 1, 2]),
    ("mix", 1.0, [2, 1, 0]),
    ("ce", 0.3, [2, 1, 0]),
])
def test_mix_fusion_reorders_by_alpha(fusion, alpha, want):
  rr = reranker.Reranker(_LogitModel(), k=3, query_block=2, fusion=fusion, alpha=alpha)
  out = rr({}, _mix_pairs, np.array([[0, 1, 2]]), MIX_COSINES)
  assert out["ids"].tolist() == [want]
  p = 1 / (1 + np.exp(-MIX_LOGITS.astype(np.float64)))
  score = alpha * p + (1 - alpha) * MIX_COSINES[0] if fusion == "mix" else MIX_LOGITS
  np.testing.assert_allclose(out["score"][0], score[want], rtol=1e-5)


def _retriever(search):
  """A Retriever over 3 images whose model, engine and index are stand-ins; config.search =
  `search` (the checkpoint config's field)."""
  config = demo.get_config("runlocal,mode=joint_sum")
  config.search = search
  def regions(rows):  # [n, 1, 1] the logit of each image, [n, 1] mask
    return MIX_LOGITS[np.asarray(rows)][:, None, None], np.ones((len(rows), 1), bool)

  corpus = batches.RetrievalData(
      token_ids=np.zeros((3, 2), np.int32), text_mask=np.ones((3, 2), bool),
      caption_image=np.arange(3, dtype=np.int32), image_ids=np.arange(3, dtype=np.int64),
      region_features=regions)
  engine = types.SimpleNamespace(ce_params={},
                                 embed_texts=lambda ids, mask: np.zeros((len(ids), 4), np.float32))
  def tokens(texts):
    return np.zeros((len(texts), 2), np.int32), np.ones((len(texts), 2), bool)

  restored = types.SimpleNamespace(config=config, model=_LogitModel(), mode=modes.get(config.mode),
                                   engine=lambda batch_size: engine, text_inputs=tokens)
  index = types.SimpleNamespace(  # the BE top k: ids 0, 1, 2 with MIX_COSINES
      search=lambda q, k: (np.tile(np.arange(3), (len(q), 1))[:, :k],
                           np.tile(MIX_COSINES, (len(q), 1))[:, :k]))
  return retriever.Retriever(restored, corpus, ["a", "b", "c"], index, {})


def test_search_config_fusion_reaches_the_retriever_order():
  order = lambda r: [h["row"] for h in r.search("a query", k=3)[0]]  # noqa: E731
  assert order(_retriever(dict(fusion="mix", alpha=0.3, query_block=8))) == [1, 0, 2]
  assert order(_retriever(dict(fusion="mix", alpha=1.0, query_block=8))) == [2, 1, 0]
  assert order(_retriever(demo.get_config("runlocal").search)) == [2, 1, 0]  # the default: CE
  r = _retriever(dict(fusion="combination", fusion_weight=0.9, query_block=8))
  assert order(r) == [1, 2, 0]  # .1 * logit + .9 * cosine = .3, .86, .6
