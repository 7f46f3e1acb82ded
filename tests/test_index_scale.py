"""Index at scale: ScaNN leaves calibrated for a target recall (kept in the metadata), and a corpus
indexed as one shard per process, searched by merging per-shard top-k."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from rerank.indexing import calibrate
from rerank.indexing import indexes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clustered(n, d, seed=0, clusters=40):
  """Unit vectors around shared cluster centres (seed picks the sample, not the centres)."""
  centres = np.random.default_rng(123).normal(size=(clusters, d))
  rng = np.random.default_rng(seed)
  x = centres[rng.integers(clusters, size=n)] + 1.5 * rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _cfg(**fields):
  return ml_collections.ConfigDict({**dict(num_leaves=40, target_recall=0.95, recall_k=10,
                                           calibration_queries=200), **fields})


def _recall(index, queries, k, leaves=None):
  got = index.search(queries, k, leaves)[0] if leaves else index.search(queries, k)[0]
  return calibrate.recall_at_k(got, indexes.ExactIndex(index_corpus).search(queries, k)[0])


index_corpus = _clustered(4000, 24)


def test_calibration_meets_the_target_with_the_fewest_leaves_and_is_saved(tmp_path):
  queries = _clustered(200, 24, seed=1)  # held out: not in the corpus
  idx = indexes.build(index_corpus, "scann", _cfg(), queries=queries)
  p, cal = idx.params, idx.params.calibration
  assert cal["source"] == "held-out queries" and cal["queries"] == 200 and cal["k"] == 10
  assert cal["met"] and p.leaves_to_search == cal["leaves_to_search"] < p.num_leaves
  # Measured again here, independently of the calibration's own bookkeeping.
  assert _recall(idx, queries, 10) == pytest.approx(cal["recall"]) and cal["recall"] >= 0.95
  if p.leaves_to_search > 1:  # the fewest: one leaf less misses the target
    assert _recall(idx, queries, 10, p.leaves_to_search - 1) < 0.95
  assert dict(cal["tried"])[p.leaves_to_search] == cal["recall"]

  indexes.save(idx, str(tmp_path / "idx"), {"dim": 24})
  meta = json.loads((tmp_path / "idx" / "index.json").read_text())
  assert meta["scann"]["leaves_to_search"] == p.leaves_to_search
  assert meta["scann"]["target_recall"] == 0.95 and meta["scann"]["calibration"] == cal
  loaded, _, _ = indexes.load(str(tmp_path / "idx"))
  assert loaded.params == p
  np.testing.assert_array_equal(loaded.search(queries, 10)[0], idx.search(queries, 10)[0])


def test_calibration_without_queries_leaves_each_corpus_row_out():
  idx = indexes.build(index_corpus, "scann", _cfg(target_recall=0.99))
  cal = idx.params.calibration
  assert cal["source"] == "corpus rows, leave-one-out" and cal["met"] and cal["recall"] >= 0.99
  own = calibrate.sample_rows(len(index_corpus), 200)
  q = index_corpus[own]
  found = calibrate.without_rows(idx.search(q, 11)[0], own, 10)
  assert not (found == own[:, None]).any()
  truth = calibrate.without_rows(indexes.ExactIndex(index_corpus).search(q, 11)[0], own, 10)
  assert calibrate.recall_at_k(found, truth) == pytest.approx(cal["recall"])


def test_fixed_leaves_turn_calibration_off_and_bad_targets_are_errors():
  idx = indexes.build(index_corpus, "scann", _cfg(leaves_to_search=7))
  assert idx.params.leaves_to_search == 7 and idx.params.calibration is None
  assert indexes.scann_params(4000, _cfg(target_recall=0.0)).target_recall == 0.0
  with pytest.raises(ValueError, match="target_recall"):
    calibrate.choose_leaves(lambda leaves: 1.0, 10, 1.5)
  # Unreachable: every leaf is searched, and the record says the target was not met.
  out = calibrate.choose_leaves(lambda leaves: leaves / 100, 10, 0.5)
  assert out == {"leaves_to_search": 10, "recall": 0.1, "met": False, "tried": [[10, 0.1]]}
  assert calibrate.recall_at_k(np.array([[1, 2, -1]]), np.array([[2, 3, 1]])) == pytest.approx(2 / 3)


def test_two_shards_give_the_exact_top_k(tmp_path):
  corpus, queries = _clustered(1001, 16, seed=2), _clustered(30, 16, seed=3)
  corpus[1000] = corpus[5]  # a tie across the shards: the lower global id first, as exact
  queries[0] = corpus[5]
  path = str(tmp_path / "sharded")
  for j in range(2):  # as two processes would, each its own rows
    a, b = indexes.shard_rows(len(corpus), 2, j)
    indexes.save_shard(indexes.ExactIndex(corpus[a:b]), path, j, a)
  with pytest.raises(ValueError, match="shard 2 of 3 was not written"):
    indexes.publish_shards(path, 3, {"dim": 16})
  indexes.publish_shards(path, 2, {"dim": 16}, {"image_ids": np.arange(1001) + 7})
  want_ids, want_scores = indexes.ExactIndex(corpus).search(queries, 25)

  whole, meta, arrays = indexes.load(path, expect={"dim": 16})
  assert whole.kind == "sharded" and meta["offsets"] == [0, 501] and meta["size"] == 1001
  np.testing.assert_array_equal(arrays["image_ids"], np.arange(1001) + 7)
  ids, scores = whole.search(queries, 25)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
  assert ids[0, 0] == 5 and ids[0, 1] == 1000

  parts = [indexes.load_shard(path, j) for j in range(2)]  # what each process loads
  assert [offset for _, offset in parts] == [0, 501] and parts[1][0].size == 500
  found = [shard.search(queries, 25) for shard, _ in parts]
  merged = indexes.merge_topk(np.concatenate([i + o for (i, _), (_, o) in zip(found, parts)], 1),
                              np.concatenate([s for _, s in found], 1), 25)
  np.testing.assert_array_equal(merged[0], want_ids)
  with pytest.raises(ValueError, match="shard 2"):
    indexes.load_shard(path, 2)


_HOST_SCRIPT = """
import sys, numpy as np, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2, process_id=pid)
from rerank.indexing import indexes
rng = np.random.default_rng(0)
corpus = rng.normal(size=(301, 8)).astype(np.float32)
queries = rng.normal(size=(9, 8)).astype(np.float32)
a, b = indexes.shard_rows(len(corpus), jax.process_count(), jax.process_index())
indexes.save_multihost(indexes.ExactIndex(corpus[a:b]), path, a, {"dim": 8})  # only its rows
shard, offset = indexes.load_shard(path, jax.process_index())
ids, _ = indexes.search_multihost(shard, offset, queries, 12)
np.savez(out, ids=ids, offset=offset, size=shard.size)
"""


def test_each_process_builds_and_searches_its_own_shard(tmp_path, reserve_port):
  port = str(reserve_port())  # held until the test ends (conftest.py)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  path = str(tmp_path / "index")
  procs = [subprocess.Popen([sys.executable, "-c", _HOST_SCRIPT, port, str(i), path,
                             str(tmp_path / f"out{i}.npz")], env=env, stderr=subprocess.PIPE)
           for i in range(2)]
  try:
    errs = [p.communicate(timeout=180)[1] for p in procs]
  finally:  # one process failing leaves the other waiting for it
    for p in procs:
      p.kill()
      p.wait(timeout=60)
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err.decode()[-2000:]
  rng = np.random.default_rng(0)
  corpus = rng.normal(size=(301, 8)).astype(np.float32)
  queries = rng.normal(size=(9, 8)).astype(np.float32)
  want = indexes.ExactIndex(corpus).search(queries, 12)[0]
  for i, (offset, size) in enumerate([(0, 151), (151, 150)]):
    got = np.load(tmp_path / f"out{i}.npz")
    assert (int(got["offset"]), int(got["size"])) == (offset, size)
    np.testing.assert_array_equal(got["ids"], want)
  np.testing.assert_array_equal(indexes.load(path)[0].search(queries, 12)[0], want)
  assert sorted(os.listdir(tmp_path)) == ["index", "out0.npz", "out1.npz"]  # no staging left


def test_index_flag_rejects_a_target_outside_0_1():
  from rerank import index  # noqa: PLC0415
  with pytest.raises(ValueError, match=r"--target_recall: expected a recall in \[0, 1\]; found 1.5"):
    index.build_index("unused", "unused", target_recall=1.5)
