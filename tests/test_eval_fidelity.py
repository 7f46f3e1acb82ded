"""Evaluation you can quote: float32 scores, ties that favour nothing, RR on corpora smaller
than k, compilation outside the timers, and the authors' fusion modes."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rerank.data import batches
from rerank.data import datasets
from rerank.data import eval_sets
from rerank.evaluation import evaluator
from rerank.evaluation import metrics
from rerank.indexing import ranking
from rerank.inference import engine
from rerank.inference import reranker
from rerank.models import build
from rerank.training import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402

QUIET = dict(log=lambda *_: None)


# ------------------------------------------------------------------ a table-driven stand-in

def _data(img_emb, caption_image, ids=None, txt_rows=None):
  """RetrievalData whose captions carry a row of a text table (token 0) and whose images carry
  their embedding as region 0."""
  img_emb = np.asarray(img_emb, np.float32)
  t = len(caption_image)
  rows = np.arange(t) if txt_rows is None else np.asarray(txt_rows)
  return batches.RetrievalData(
      token_ids=np.stack([rows, np.zeros(t, int)], 1).astype(np.int32),
      text_mask=np.ones((t, 2), bool), caption_image=np.asarray(caption_image, np.int32),
      image_ids=np.arange(len(img_emb), dtype=np.int64) if ids is None else np.asarray(ids),
      region_features=lambda r: (img_emb[np.asarray(r)][:, None], np.ones((len(r), 1), bool)))


def _permuted(data, img_perm, txt_perm):
  """The same corpus stored in another order: image row i of the result is img_perm[i]."""
  inv = np.argsort(img_perm)
  feats = lambda r, d=data: d.region_features(np.asarray(img_perm)[np.asarray(r)])  # noqa: E731
  return batches.RetrievalData(
      token_ids=data.token_ids[txt_perm], text_mask=data.text_mask[txt_perm],
      caption_image=inv[data.caption_image[txt_perm]].astype(np.int32),
      image_ids=data.image_ids[img_perm], region_features=feats)


class _Scorer:
  """BE: texts from a table, images from their region 0; CE: a coarsely rounded dot product,
  so that CE scores tie as well. Everything depends on content, never on the storage row."""

  def __init__(self, table):
    self.table = np.asarray(table, np.float32)

  def texts(self, data, rows):
    return self.table[data.token_ids[np.asarray(rows, np.int64), 0]]

  def images(self, data, rows):
    return data.region_features(np.asarray(rows, np.int64))[0][:, 0]

  def pairs(self, data, texts, images, desc=None):
    s = (self.texts(data, texts) * self.images(data, images)).sum(-1)
    return np.round(s * 2) / 2


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(k=5, ce_queries_t2i=0, ce_queries_i2t=0,
                                             rr_queries_t2i=0, rr_queries_i2t=0), **kw))


def _scores(rows):
  """What must not depend on storage order: recalls, mR and tie counts of every row."""
  return [(r["method"], r["t2i"], r["i2t"], r["mR"], r["ties"]) for r in rows]


# ------------------------------------------------------------------ ties

def test_tie_ranks_break_ties_against_the_relevant_item():
  scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1],
                     [0.2, 0.2, 0.2, 0.2, 0.2],
                     [0.3, 0.2, 0.1, 0.0, 0.0]])
  rel = np.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], bool)
  pess, opt = ranking.tie_ranks(scores, rel)
  np.testing.assert_array_equal(pess, [3, 4, 5])  # 0.9 above, two non-relevant 0.5s tie
  np.testing.assert_array_equal(opt, [1, 0, 5])
  assert metrics.tied_hits(pess, opt) == {"R@1": 1, "R@5": 0, "R@10": 0}
  assert metrics.tied_hits(pess, opt, ks=(2, 4)) == {"R@2": 2, "R@4": 1}
  # The same rule as a ranking: among equal scores the relevant items go last.
  top = ranking.ranking_from_scores(scores, 4, loses_ties=rel)
  np.testing.assert_array_equal(top[:2], [[1, 0, 3, 2], [0, 1, 2, 3]])
  be = np.array([[7, 8, 9]])
  np.testing.assert_array_equal(
      ranking.rerank_topk(be, np.array([[1.0, 1.0, 0.0]]), np.array([[True, False, False]])),
      [[8, 7, 9]])


def test_settle_ties_looks_past_the_end_of_a_truncated_list():
  full = np.array([[0.9, 0.5, 0.5, 0.5, 0.5, 0.1]])  # item 1 relevant, tied with 2, 3, 4
  rel = np.array([[0, 1, 0, 0, 0, 0]], bool)
  ids, scores = np.array([[0, 1, 2]]), full[:, :3]  # an index's top 3: lower ids won the tie
  calls = []

  def row_scores(r):
    calls.append(list(r))
    return full[r]

  ids2, _, pess, opt = ranking.settle_ties(ids, scores, rel, row_scores)
  # Inside the list it would be rank 2; items 3 and 4 outside tie too, so it is rank 4.
  assert calls == [[0]] and pess.tolist() == [3] and opt.tolist() == [1]
  np.testing.assert_array_equal(ids2, [[0, 2, 3]])  # the first 3 of the pessimistic order
  # A relevant item strictly inside the list needs no full row.
  calls.clear()
  out = ranking.settle_ties(np.array([[1, 0, 2]]), np.array([[0.9, 0.5, 0.4]]),
                            np.array([[1, 0, 0, 0]], bool), row_scores)
  assert calls == [] and out[2].tolist() == [1]


def test_all_equal_scores_give_the_same_recalls_in_any_storage_order():
  n_img, per = 12, 2
  caption_image = np.arange(n_img).repeat(per)
  data = _data(np.ones((n_img, 4)), caption_image)
  scorer = _Scorer(np.ones((n_img * per, 4)))
  rng = np.random.default_rng(0)
  results = []
  for img_perm, txt_perm in [(np.arange(n_img), np.arange(n_img * per)),
                             (np.arange(n_img)[::-1], np.arange(n_img * per)[::-1]),
                             (rng.permutation(n_img), rng.permutation(n_img * per))]:
    d = _permuted(data, img_perm, txt_perm)
    results.append(evaluator.evaluate(scorer, d, "joint_sum", _cfg(k=5), **QUIET))
  assert _scores(results[0]) == _scores(results[1]) == _scores(results[2])
  for row in results[0]:  # every relevant item ties with 10+ others and loses: R@10 = 0
    assert row["t2i"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0}, row["method"]
    assert row["i2t"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0}, row["method"]
    assert row["ties"]["t2i"]["R@1"] == n_img * per and row["ties"]["i2t"]["R@10"] == n_img
  table = evaluator.results_markdown(dict(dataset="x", split="test", num_images=n_img,
                                          num_texts=n_img * per, rows=results[0]))
  assert "joint BE t2i R@1: 24" in table and "joint RR i2t R@10: 12" in table


def test_enlarged_corpus_with_ties_gives_the_same_recalls_in_any_storage_order():
  e = np.eye(4, dtype=np.float32)
  main_img = e[[0, 1, 2, 3, 0, 1]]  # images 4, 5 look like 0, 1
  main = _data(main_img, np.arange(6).repeat(2), ids=np.arange(6) + 100)
  dis = _data(e[[0, 2, 2]], [0, 1, 2], ids=[100, 101, 102], txt_rows=np.arange(12, 15))
  table = np.concatenate([main_img.repeat(2, 0), e[[0, 2, 2]]])  # captions = their image
  scorer = _Scorer(table)
  s = eval_sets.enlarge(main, dis)
  n, t = s.data.num_images, s.data.num_texts
  rng = np.random.default_rng(1)
  orders = [(np.arange(n), np.arange(t)),  # main first, as enlarge stores it
            (np.r_[6:n, 0:6], np.r_[12:t, 0:12]),  # distractors first
            (rng.permutation(n), rng.permutation(t))]
  results = []
  for img_perm, txt_perm in orders:
    d = _permuted(s.data, img_perm, txt_perm)
    qt = np.sort(np.argsort(txt_perm)[s.query_texts])  # where the main rows now live
    qi = np.sort(np.argsort(img_perm)[s.query_images])
    results.append(evaluator.evaluate(scorer, d, "joint_sum", _cfg(k=3), query_texts=qt,
                                      query_images=qi, **QUIET))
  assert _scores(results[0]) == _scores(results[1]) == _scores(results[2])
  be = results[0][0]
  # Only image 3 looks like no other: images 0 and 4 tie with each other and a distractor,
  # 1 with 5, 2 with two distractors. So only image 3's 2 captions hit R@1; the other 10 lost
  # a tie there.
  assert be["method"] == "BE" and be["t2i"]["R@1"] == pytest.approx(100 * 2 / 12)
  assert be["ties"]["t2i"]["R@1"] == 10


def test_rr_on_a_corpus_smaller_than_k_clamps_and_records_k():
  e = np.eye(4, dtype=np.float32)
  data = _data(e[:3], [0, 0, 1, 1, 2, 2])
  rows = evaluator.evaluate(_Scorer(e[[0, 0, 1, 1, 2, 2]]), data, "joint_sum", _cfg(k=20), **QUIET)
  rr = rows[-1]
  assert rr["method"] == "RR" and rr["k"] == 20
  assert rr["k_effective"] == {"t2i": 3, "i2t": 6}
  assert rr["t2i"]["R@1"] == 100.0 and rr["i2t"]["R@1"] == 100.0
  assert all(c == 0 for r in rows for d in r["ties"].values() for c in d.values())
  assert "tie" not in evaluator.results_markdown(dict(dataset="x", split="test", num_images=3,
                                                      num_texts=6, rows=rows))


# ------------------------------------------------------------------ fusion

CE = np.array([[3.0, 1.0, 2.0]])
BE = np.array([[0.1, 0.9, 0.5]])


@pytest.mark.parametrize("fusion, weight, want", [
    ("standard", 0.7, [3.0, 1.0, 2.0]),
    ("ce", 0.7, [3.0, 1.0, 2.0]),  # the older name of "standard"
    ("combination", 0.5, [1.55, 0.95, 1.25]),
    ("combination_normalized", 0.25, [0.75, 0.25, 0.5]),  # CE -> [1, 0, .5], BE -> [0, 1, .5]
    ("rank", 0.25, [-0.5, -1.5, -1.0]),  # CE ranks [0, 2, 1], BE ranks [2, 0, 1]
])
def test_fusion_modes_by_hand(fusion, weight, want):
  np.testing.assert_allclose(ranking.fuse(CE, BE, fusion, weight), [want], rtol=1e-6)
  got = jax.jit(lambda c, b: ranking.fuse(c, b, fusion, weight, xp=jnp))(CE, BE)
  np.testing.assert_allclose(np.asarray(got), [want], rtol=1e-6)


def test_fusion_ignores_padded_candidates_and_rejects_bad_input():
  valid = np.array([[True, True, True, False]])
  ce, be = np.c_[CE, [[100.0]]], np.c_[BE, [[-5.0]]]
  np.testing.assert_allclose(ranking.fuse(ce, be, "combination_normalized", 0.25, valid)[:, :3],
                             [[0.75, 0.25, 0.5]])
  np.testing.assert_allclose(ranking.fuse(ce, be, "rank", 0.25, valid)[:, :3], [[-0.5, -1.5, -1.0]])
  np.testing.assert_allclose(ranking.fuse(np.ones((1, 3)), BE, "combination_normalized", 0.0),
                             [[0.0, 0.0, 0.0]])  # a constant row normalises to 0
  with pytest.raises(ValueError, match="fusion: expected one of"):
    ranking.fuse(CE, BE, "sum")
  with pytest.raises(ValueError, match="weight"):
    ranking.fuse(CE, BE, "combination", 1.5)


def test_rr_fusion_is_chosen_by_config():
  e = np.eye(4, dtype=np.float32)
  img = np.stack([e[0], e[1], e[2], e[3]])
  data = _data(img, [0, 1, 2, 3])
  # Captions near their image for the BE; the CE (rounded dot product of these) is all 0, so
  # CE alone ties everything and loses, while the cosine alone is the BE order.
  scorer = _Scorer(0.2 * img + 0.01)
  rows = {f: evaluator.evaluate(scorer, data, "joint_sum", _cfg(k=4, fusion=f, fusion_weight=1.0),
                                methods=("BE", "RR"), **QUIET)
          for f in ("standard", "combination")}
  be, rr_ce = rows["standard"]
  _, rr_cos = rows["combination"]
  assert be["t2i"]["R@1"] == 100.0 and rr_ce["t2i"]["R@1"] == 0.0
  assert rr_cos["t2i"] == be["t2i"] and rr_cos["fusion"] == {"mode": "combination", "weight": 1.0}
  assert rr_ce["fusion"]["mode"] == "standard"


def test_validate_checks_the_fusion_fields():
  config = demo.get_config("runlocal")
  assert not [p for p in validate.problems(config, files=False) if "fusion" in p]
  config.eval.fusion, config.eval.fusion_weight = "sum", 1.5
  found = [p for p in validate.problems(config, files=False) if "fusion" in p]
  assert found == [
      "config.eval.fusion: expected one of ['standard', 'combination', 'combination_normalized', "
      "'rank', 'ce']; found 'sum'",
      "config.eval.fusion_weight: expected a number >= 0.0 and <= 1.0; found 1.5"]


# ------------------------------------------------------------------ a real tiny model

@pytest.fixture(scope="module")
def bf16():
  config = demo.get_config("runlocal")
  config.model.dtype = "bfloat16"
  tok = datasets.get_tokenizer(config)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  params = build.init_params(model, config, jax.random.PRNGKey(0))
  data, _ = datasets.load_split(config, "test", tok, 32)
  return config, model, params, data


def test_bf16_model_gives_float32_scores_that_do_not_tie(bf16):
  config, model, params, data = bf16
  eng = engine.Engine(model, config.mode, 128, params)
  rng = np.random.default_rng(0)
  pair = rng.choice(data.num_texts * data.num_images, 1000, replace=False)
  t, i = pair // data.num_images, pair % data.num_images
  scores = engine.DataScorer(eng).pairs(data, t, i)
  txt = eng.embed_texts(data.token_ids[:8], data.text_mask[:8])
  img = eng.embed_images(*data.region_features(np.arange(4)))
  assert {a.dtype for a in (scores, txt, img)} == {np.dtype(np.float32)}
  distinct = len(np.unique(scores))
  assert distinct >= 995, distinct
  # The same scores rounded to bf16 (what a bf16 head gave) would tie: the check can fail.
  assert len(np.unique(scores.astype(jnp.bfloat16))) < 900
  # The jitted rerank returns float32 scores too.
  rr = reranker.Reranker(model, k=4, query_block=2, fusion="combination", weight=0.5)
  regions, mask = data.region_features(np.arange(4))

  def pairs(rows, cand):
    return (np.repeat(data.token_ids[rows][:, None], 4, 1), np.repeat(data.text_mask[rows][:, None], 4, 1),
            np.broadcast_to(regions[None], (len(rows),) + regions.shape),
            np.broadcast_to(mask[None], (len(rows),) + mask.shape))
  out = rr(params, pairs, np.tile(np.arange(4), (2, 1)), np.ones((2, 4), np.float32))
  assert {out[n].dtype for n in ("score", "ce", "be")} == {np.dtype(np.float32)}
  raw = rr.fn(params, *pairs(np.arange(2), np.tile(np.arange(4), (2, 1))),
              np.tile(np.arange(4), (2, 1)), np.ones((2, 4), np.float32), np.ones((2, 4), bool))
  assert {raw[n].dtype for n in ("score", "ce", "be")} == {jnp.dtype(jnp.float32)}


class _CompileCount:
  """Counts XLA compilations (jax's backend-compile event) since the listener was registered."""

  count = 0

  @classmethod
  def listen(cls, event, _duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      cls.count += 1


jax.monitoring.register_event_duration_secs_listener(_CompileCount.listen)


def _first_images(data, n):
  """The first n images of a split with their captions (a smaller, faster evaluation)."""
  rows = np.flatnonzero(data.caption_image < n)
  return batches.RetrievalData(data.token_ids[rows], data.text_mask[rows], data.caption_image[rows],
                               data.image_ids[:n], data.region_features)


@pytest.mark.parametrize("warm_up, methods", [(True, ("BE", "CE", "RR")), (False, ("BE",))])
def test_compilation_is_outside_every_timed_section(bf16, warm_up, methods):
  config, model, params, data = bf16
  data = _first_images(data, 8)
  scorer = engine.DataScorer(engine.Engine(model, config.mode, 32, params))  # fresh jit caches
  readings = []  # compilations so far, at each clock read; reads come in (start, stop) pairs

  def clock():
    readings.append(_CompileCount.count)
    return 0.0

  start = _CompileCount.count
  cfg = _cfg(k=5, ce_queries_t2i=4, ce_queries_i2t=2, rr_queries_t2i=10, rr_queries_i2t=5)
  rows = evaluator.evaluate(scorer, data, config.mode, cfg, clock=clock, warm_up=warm_up,
                            methods=methods, **QUIET)
  assert [r["method"] for r in rows] == list(methods)
  assert all(r["timing"] == evaluator.TIMING[r["method"]] for r in rows)
  assert len(readings) % 2 == 0 and len(readings) >= 4
  compiled_inside = [b - a for a, b in zip(readings[::2], readings[1::2])]
  assert _CompileCount.count > start  # something did compile (a fresh engine)
  if warm_up:
    assert compiled_inside == [0] * len(compiled_inside), compiled_inside
  else:  # without the warm-up the first call of each shape lands inside a timer
    assert sum(compiled_inside) > 0
