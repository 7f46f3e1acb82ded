"""Index backends: exact equals brute force, ScaNN recall, sharding, save/load, the eval switch."""

import dataclasses
import os

import ml_collections
import numpy as np
import pytest

from rerank.evaluation import evaluator
from rerank.indexing import indexes


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d, centers=50, spread=0.3, seed=0):
  rng = np.random.default_rng(seed)
  c = rng.normal(size=(centers, d))
  return _unit(c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, d)))


def _top_k_written_out(queries, corpus, k):
  """The reference, independent of rerank.indexing: every dot product in a Python loop, then
  a sort by (score descending, id ascending). Returns (ids [Q, k], scores [Q, k])."""
  ids, scores = [], []
  for q in np.asarray(queries, np.float64):
    s = [float(sum(a * b for a, b in zip(q, c))) for c in np.asarray(corpus, np.float64)]
    order = sorted(range(len(s)), key=lambda j: (-s[j], j))[:k]
    ids.append(order)
    scores.append([s[j] for j in order])
  return np.array(ids, np.int64), np.array(scores)


def test_exact_equals_brute_force_ranking_with_ties():
  # Small integer coordinates: every dot product is exact in float32 and float64, and ties are
  # everywhere, also straddling the k-th place (argpartition's boundary case).
  rng = np.random.default_rng(0)
  corpus = rng.integers(-2, 3, (300, 4)).astype(np.float32)
  queries = rng.integers(-2, 3, (40, 4)).astype(np.float32)
  for k in (1, 7, 25, 300):
    ids, scores = indexes.ExactIndex(corpus).search(queries, k)
    want_ids, want_scores = _top_k_written_out(queries, corpus, k)
    np.testing.assert_array_equal(ids, want_ids, err_msg=f"k={k}")
    np.testing.assert_array_equal(scores, want_scores, err_msg=f"k={k}")
  # Unit vectors with an exact duplicate: the tie goes to the lower id.
  corpus = _unit(rng.normal(size=(300, 16)))
  corpus[10] = corpus[200]
  queries = _unit(rng.normal(size=(40, 16)))
  queries[0] = corpus[200]
  ids, scores = indexes.ExactIndex(corpus).search(queries, 25)
  want_ids, want_scores = _top_k_written_out(queries, corpus, 25)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  assert ids[0, 0] == 10 and ids[0, 1] == 200
  gaps = np.diff(-want_scores, axis=1)  # away from float32 near-ties the order is the same
  clear = np.concatenate([gaps > 1e-5, np.ones((len(gaps), 1), bool)], 1) & np.concatenate(
      [np.ones((len(gaps), 1), bool), gaps > 1e-5], 1)
  np.testing.assert_array_equal(ids[clear], want_ids[clear])


def test_jax_backend_matches_exact():
  corpus, queries = _clustered(500, 16), _clustered(37, 16, seed=1)
  ids, scores = indexes.JaxIndex(corpus, query_block=16).search(queries, 10)
  want_ids, want_scores = indexes.ExactIndex(corpus).search(queries, 10)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  assert (ids == want_ids).mean() > 0.99  # float rounding may swap near-equal neighbours


def test_scann_recall_against_exact():
  corpus, queries = _clustered(6000, 32), _clustered(100, 32, seed=2)
  idx = indexes.build(corpus, "scann")
  assert idx.kind == "scann" and idx.params.num_leaves > 1
  got, _ = idx.search(queries, 20)
  want, _ = indexes.ExactIndex(corpus).search(queries, 20)
  recall = np.mean([len(set(g) & set(w)) / 20 for g, w in zip(got, want)])
  assert recall >= 0.9, recall


def test_auto_picks_exact_for_small_and_scann_for_large():
  cfg = ml_collections.ConfigDict(dict(exact_max=1000, num_leaves=8, leaves_to_search=0,
                                       reorder=0, dims_per_block=0, aq_threshold=0.0,
                                       training_sample=0))
  assert indexes.build(_clustered(1000, 8), "auto", cfg).kind == "exact"
  big = indexes.build(_clustered(1001, 8), "auto", cfg)
  assert big.kind == "scann" and big.params.num_leaves == 8 and big.params.reorder == 500
  with pytest.raises(ValueError, match="expected one of"):
    indexes.build(_clustered(10, 8), "faiss")


def test_sharded_merge_equals_exact_and_multihost_single_process():
  corpus, queries = _clustered(1000, 16), _clustered(20, 16, seed=3)
  corpus[999] = corpus[3]  # a tie across shards: lower global id first
  queries[0] = corpus[3]
  bounds = [indexes.shard_rows(1000, 3, j) for j in range(3)]
  assert bounds[0][0] == 0 and bounds[-1][1] == 1000
  sharded = indexes.ShardedIndex([indexes.ExactIndex(corpus[a:b]) for a, b in bounds],
                               [a for a, _ in bounds])
  ids, scores = sharded.search(queries, 15)
  want_ids, want_scores = indexes.ExactIndex(corpus).search(queries, 15)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
  assert ids[0, 0] == 3 and ids[0, 1] == 999
  a, b = bounds[1]
  local = indexes.search_multihost(indexes.ExactIndex(corpus[a:b]), a, queries, 5)[0]
  np.testing.assert_array_equal(local, indexes.ExactIndex(corpus[a:b]).search(queries, 5)[0] + a)


def test_k_is_clamped_and_bad_input_is_an_error():
  idx = indexes.ExactIndex(_clustered(7, 4))
  ids, _ = idx.search(_clustered(2, 4), 20)
  assert ids.shape == (2, 7) and sorted(ids[0].tolist()) == list(range(7))
  with pytest.raises(ValueError, match="k: expected >= 1"):
    idx.search(_clustered(2, 4), 0)
  with pytest.raises(ValueError, match=r"expected \[Q, 4\]"):
    idx.search(_clustered(2, 5), 3)
  with pytest.raises(ValueError, match="non-empty"):
    indexes.ExactIndex(np.zeros((0, 4)))


@pytest.mark.parametrize("backend", ["exact", "scann", "jax", "sharded"])
def test_save_load_round_trip(tmp_path, backend):
  corpus, queries = _clustered(3000, 16), _clustered(30, 16, seed=4)
  if backend == "sharded":
    idx = indexes.ShardedIndex([indexes.ExactIndex(corpus[:1200]), indexes.build(corpus[1200:], "scann")],
                             [0, 1200])
  else:
    idx = indexes.build(corpus, backend)
  identity = {"checkpoint": "/ckpt:best (step 3)", "fingerprint": "abc", "dim": 16}
  path = str(tmp_path / "idx")
  indexes.save(idx, path, identity, {"item_ids": np.arange(3000) + 7})
  indexes.save(idx, path, identity, {"item_ids": np.arange(3000) + 7})  # replacing works too
  assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temporary directory left behind
  loaded, meta, arrays = indexes.load(path, expect={"fingerprint": "abc", "dim": 16})
  assert meta["identity"] == identity and loaded.size == 3000 and loaded.dim == 16
  np.testing.assert_array_equal(arrays["item_ids"], np.arange(3000) + 7)
  a, b = idx.search(queries, 12), loaded.search(queries, 12)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_load_refuses_another_checkpoint_or_size(tmp_path):
  path = str(tmp_path / "idx")
  indexes.save(indexes.ExactIndex(_clustered(50, 8)), path, {"fingerprint": "abc", "dim": 8})
  with pytest.raises(indexes.IndexMismatchError, match="fingerprint='abc'.*'xyz'.*rebuild"):
    indexes.load(path, expect={"fingerprint": "xyz"})
  with pytest.raises(indexes.IndexMismatchError, match="dim=8 .*dim=16"):
    indexes.load(path, expect={"dim": 16})
  with pytest.raises(FileNotFoundError, match="no index here"):
    indexes.load(str(tmp_path / "missing"))


class _FakeScorer:
  def __init__(self, img, txt):
    self.img, self.txt = img, txt

  def images(self, data, rows):
    return self.img[rows]

  def texts(self, data, rows):
    return self.txt[rows]


def _fake_data(n_img=60, per=3, seed=0):
  from rerank.data import batches  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  img = _clustered(n_img, 16, centers=8, seed=seed)
  cap_img = np.repeat(np.arange(n_img), per).astype(np.int32)
  txt = _unit(img[cap_img] + 0.8 * rng.normal(size=(len(cap_img), 16)))
  txt[5] = txt[4]  # duplicate queries and tied scores exercise the tie-break
  data = batches.RetrievalData(
      token_ids=np.zeros((len(cap_img), 2), np.int32), text_mask=np.ones((len(cap_img), 2), bool),
      caption_image=cap_img, image_ids=np.arange(n_img) + 100, region_features=None)
  return _FakeScorer(img, txt), data, img, txt


def _recalls_written_out(sims, relevant, ks=(1, 5, 10)):
  """R@k (percent) from full score rows: a query's rank is the number of candidates scoring
  above its best relevant one, plus the non-relevant ones tying with it (ties count against)."""
  hits = dict.fromkeys(ks, 0)
  for s, rel in zip(sims.tolist(), relevant.tolist()):
    best = max(v for v, r in zip(s, rel) if r)
    rank = sum(1 for v, r in zip(s, rel) if v > best or (v == best and not r))
    for k in ks:
      hits[k] += rank < k
  return {f"R@{k}": 100.0 * hits[k] / len(sims) for k in ks}


def test_evaluate_with_exact_index_equals_plain_brute_force():
  scorer, data, img, txt = _fake_data()
  cfg = ml_collections.ConfigDict(dict(k=20, index="exact"))
  row = evaluator.evaluate(scorer, data, "be", cfg, methods=("BE",), log=lambda *_: None)[0]
  # The reference, written out over the full score matrix (no rerank.indexing / metrics code).
  rel = data.image_ids[data.caption_image][:, None] == data.image_ids[None, :]
  t2i, i2t = _recalls_written_out(txt @ img.T, rel), _recalls_written_out(img @ txt.T, rel.T)
  six = [d[f"R@{k}"] for d in (t2i, i2t) for k in (1, 5, 10)]
  for key, want in (("t2i", t2i), ("i2t", i2t)):
    assert row[key] == pytest.approx(want), key
  assert row["mR"] == pytest.approx(sum(six) / 6) and row["rsum"] == pytest.approx(sum(six))
  assert 0 < row["t2i"]["R@1"] < row["t2i"]["R@10"] < 100  # a test set that tells them apart
  # Without the field (older configs) the first stage is the same exact search.
  old = evaluator.evaluate(scorer, data, "be", ml_collections.ConfigDict(dict(k=20)),
                          methods=("BE",), log=lambda *_: None)[0]
  assert old["t2i"] == row["t2i"] and old["i2t"] == row["i2t"]


@pytest.mark.parametrize("backend", ["jax", "scann"])
def test_evaluate_with_other_backends_is_close(backend):
  scorer, data, _, _ = _fake_data(n_img=400, per=2, seed=1)
  rows = {b: evaluator.evaluate(scorer, data, "be", ml_collections.ConfigDict(dict(k=20, index=b)),
                               methods=("BE",), log=lambda *_: None)[0] for b in ("exact", backend)}
  assert abs(rows[backend]["mR"] - rows["exact"]["mR"]) < 2.0


# ------------------------------------------------------------------ index-mined hard negatives

def test_index_mining_equals_brute_force_minus_positives():
  from rerank.training import mining  # noqa: PLC0415
  scorer, data, img, txt = _fake_data(n_img=80, per=2, seed=5)
  ids = data.image_ids.copy()
  ids[7] = ids[3]  # two rows share an image id: both are positives of image 3's captions
  data = dataclasses.replace(data, image_ids=ids)
  rows = np.array([6, 7, 14, 100, 159])  # captions 6 and 7 describe image 3
  got, scores = mining.mine_with_index(scorer, data, rows, top=10, backend="exact")
  want = mining.mine_image_negatives(scorer, data, rows, top=10)
  for g, w, s, r in zip(got, want, scores, rows):
    assert set(g.tolist()) == set(w.tolist())
    assert ids[data.caption_image[r]] not in ids[g]
    assert (np.diff(s) <= 0).all()  # best first
  got_scann, _ = mining.mine_with_index(scorer, data, rows, top=10, backend="scann")
  assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_scann, got)]) >= 0.8


def test_negative_sampling_temperature():
  from rerank.training import mining  # noqa: PLC0415
  rng = np.random.default_rng(0)
  ids = np.array([[4, 9, 2, -1]])
  scores = np.array([[0.9, 0.5, 0.1, -np.inf]], np.float32)
  hard = mining.sample_negatives(ids, scores, 2000, 0.01, rng)
  assert (hard == 4).mean() > 0.99
  uniform = mining.sample_negatives(ids, scores, 6000, 0.0, rng)
  assert set(uniform[0].tolist()) == {4, 9, 2}  # never the missing -1
  np.testing.assert_allclose([(uniform == i).mean() for i in (4, 9, 2)], 1 / 3, atol=0.03)
  warm = mining.sample_negatives(ids, scores, 6000, 0.4, rng)
  p = np.exp(np.array([0.9, 0.5, 0.1]) / 0.4)
  np.testing.assert_allclose([(warm == i).mean() for i in (4, 9, 2)], p / p.sum(), atol=0.03)


def test_mine_window_through_index_feeds_the_ce_sampler():
  from rerank.training import mining  # noqa: PLC0415
  scorer, data, _, _ = _fake_data(n_img=40, per=2, seed=6)
  config = ml_collections.ConfigDict(dict(
      batch_size=8, seed=0, hard_negatives=dict(top=5, index="exact", temperature=0.0)))
  mined = mining.mine_window(scorer, data, config, first_step=0, num_steps=3)
  assert len(mined) == 24  # three distinct batches of 8 captions
  for row, neg in mined.items():
    assert neg.shape == (5,) and ids_ok(data, row, neg)


def ids_ok(data, row, neg):
  own = data.image_ids[data.caption_image[row]]
  return (neg >= 0).all() and (data.image_ids[neg] != own).all()


_HOST_SCRIPT = """
import sys, numpy as np, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2, process_id=pid)
from rerank.indexing import indexes
rng = np.random.default_rng(0)
corpus = rng.normal(size=(501, 8)).astype(np.float32)
queries = rng.normal(size=(7, 8)).astype(np.float32)
a, b = indexes.shard_rows(len(corpus), jax.process_count(), jax.process_index())
ids, _ = indexes.search_multihost(indexes.ExactIndex(corpus[a:b]), a, queries, 9)
more, _ = indexes.search_multihost(indexes.ExactIndex(corpus[a:b]), a, queries, 300)  # > local rows
everything, _ = indexes.search_multihost(indexes.ExactIndex(corpus[a:b]), a, queries, 600)
np.savez(out, ids=ids, more=more, everything=everything)
"""


def test_multihost_search_merges_every_hosts_shard(tmp_path):
  import socket  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _HOST_SCRIPT, port, str(i),
                             str(tmp_path / f"ids{i}.npz")], env=env, stderr=subprocess.PIPE)
           for i in range(2)]
  for p in procs:
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
  rng = np.random.default_rng(0)
  corpus = rng.normal(size=(501, 8)).astype(np.float32)
  queries = rng.normal(size=(7, 8)).astype(np.float32)
  exact = indexes.ExactIndex(corpus)
  for i in range(2):  # both hosts hold the same global top-k
    got = np.load(tmp_path / f"ids{i}.npz")
    np.testing.assert_array_equal(got["ids"], exact.search(queries, 9)[0])
    np.testing.assert_array_equal(got["more"], exact.search(queries, 300)[0])
    np.testing.assert_array_equal(got["everything"], exact.search(queries, 501)[0])  # clamped
