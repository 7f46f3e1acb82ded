"""Jitted rerank (static shapes, fusion), the Retriever API and the index / search CLIs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rerank import errors
from rerank.models import build

from rerank.training import checkpoints
from rerank.indexing import indexes
from rerank.inference import engine
from rerank.inference import reranker
from rerank.inference import retriever
from rerank.training import steps
from rerank.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _make_workdir(path, seed=0):
  """A training workdir with a checkpoint of fresh parameters (no training needed here)."""
  config = demo.get_config("runlocal")
  tok = datasets.get_tokenizer(config)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  state = steps.init_train_state(model, config, steps.optimizer(config), jax.random.PRNGKey(seed))
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  ckpts = checkpoints.Checkpoints(path, async_save=False)
  ckpts.save(0, state)
  ckpts.close()
  return config, tok, model, state["params"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(workdir, index dir, config, model, params): an exact index over 32 test images."""
  root = tmp_path_factory.mktemp("search")
  work, out = str(root / "work"), str(root / "idx")
  config, tok, model, params = _make_workdir(work)
  subprocess.run([sys.executable, "-m", "rerank.index", f"--checkpoint={work}", "--split=test",
                  "--num_images=32", f"--out={out}"], check=True, env=ENV, cwd=REPO,
                 capture_output=True, text=True)
  return work, out, config, tok, model, params


def test_rerank_fn_orders_by_ce_and_never_recompiles(built):
  _, _, config, tok, model, params = built
  data, _ = datasets.load_split(config, "test", tok, 32)
  k = 6
  rr = reranker.Reranker(model, k=k, query_block=4)
  scorer = engine.DataScorer(engine.Engine(model, config.mode, 32, params))

  def pairs(rows, cand):
    b = len(rows)
    regions, mask = data.region_features(cand.reshape(-1))
    return (np.repeat(data.token_ids[rows][:, None], k, 1), np.repeat(data.text_mask[rows][:, None], k, 1),
            regions.reshape((b, k) + regions.shape[1:]), mask.reshape(b, k, -1))

  rng = np.random.default_rng(0)
  for q in (5, 3):  # different query counts, same k: one compilation
    be_ids = np.stack([rng.permutation(32)[:10] for _ in range(q)])  # [Q, 10]
    be = np.sort(rng.random((q, 10)).astype(np.float32), axis=1)[:, ::-1]
    out = rr(params, pairs, be_ids, be)
    ce = scorer.pairs(data, np.repeat(np.arange(q), k), be_ids[:, :k].reshape(-1)).reshape(q, k)
    # Written out: the top k by CE, descending, ties in BE order; the rest as the BE left them.
    want = [[row[j] for j in sorted(range(k), key=lambda j, c=c: (-c[j], j))] + list(row[k:])
            for row, c in zip(be_ids.tolist(), ce.tolist())]
    np.testing.assert_array_equal(out["ids"], want)
    np.testing.assert_allclose(out["ce"][:, :k], -np.sort(-ce, axis=1), atol=1e-4)
    np.testing.assert_array_equal(out["be"][:, k:], be[:, k:])
    assert np.isnan(out["ce"][:, k:]).all()
  assert rr.fn._cache_size() == 1  # noqa: SLF001

  # Fewer candidates than k (a tiny corpus): padded, masked, still the same compiled shape.
  out = rr(params, pairs, be_ids[:, :4], be[:, :4])
  assert out["ids"].shape == (3, 4) and sorted(out["ids"][0]) == sorted(be_ids[0, :4])
  assert rr.fn._cache_size() == 1  # noqa: SLF001

  # alpha = 0 fusion is the cosine alone: the BE order comes back unchanged.
  mix = reranker.Reranker(model, k=k, query_block=4, fusion="mix", alpha=0.0)
  np.testing.assert_array_equal(mix(params, pairs, be_ids, be)["ids"], be_ids)
  with pytest.raises(ValueError, match="fusion"):
    reranker.make_rerank_fn(model, fusion="sum")


def test_retriever_search_encode_predict(built):
  work, out, *_ = built
  r = retriever.Retriever.load(out)
  queries = ["a red cube", "a small blue sphere left of a torus"]
  be = r.search(queries, k=8, rerank=False)
  emb_q, emb_i = r.encode_texts(queries), r.encode_images(np.arange(32))
  want = indexes.ExactIndex(emb_i).search(emb_q, 8)[0]
  assert [[h["row"] for h in hits] for hits in be] == want.tolist()
  rr = r.search(queries, k=8, rerank=True)
  for query, hits, be_hits in zip(queries, rr, be):
    assert sorted(h["row"] for h in hits) == sorted(h["row"] for h in be_hits)
    ce = [h["ce_score"] for h in hits]
    assert ce == sorted(ce, reverse=True)
    rows = [h["row"] for h in hits]
    np.testing.assert_allclose(r.predict([query] * len(rows), rows), ce, atol=1e-4)
  assert len(r.search("a cube", k=500)[0]) == 32  # k beyond the corpus is clamped
  assert len(r.search("a cube", rerank=False)[0]) == r.m.config.eval.k  # k's one home
  with pytest.raises(ValueError, match="non-empty"):
    r.search(["  "])


def test_index_from_another_checkpoint_is_refused(built, tmp_path):
  _, out, *_ = built
  other = str(tmp_path / "other")
  _make_workdir(other, seed=1)
  with pytest.raises(indexes.IndexMismatchError, match="fingerprint"):
    retriever.Retriever.load(out, checkpoint_dir=other)


def test_search_cli_prints_ranked_items_and_fails_clearly(built):
  _, out, *_ = built
  run = lambda *a: subprocess.run([sys.executable, "-m", "rerank.search", f"--index={out}", *a],  # noqa: E731
                                  env=ENV, cwd=REPO, capture_output=True, text=True)
  res = run("--query=a red cube", "--k=5", "--rerank", "--show=5")
  assert res.returncode == 0, res.stderr
  lines = [l.split() for l in res.stdout.splitlines() if l.strip()[:1].isdigit()]
  assert [int(l[0]) for l in lines] == [1, 2, 3, 4, 5]
  ce = [float(l[4]) for l in lines]
  assert ce == sorted(ce, reverse=True)
  res = run("--query= ")
  assert res.returncode != 0 and "error: --query" in res.stderr
  res = subprocess.run([sys.executable, "-m", "rerank.search", "--index=/nonexistent", "--query=x"],
                       env=ENV, cwd=REPO, capture_output=True, text=True)
  assert res.returncode != 0 and "no index here" in res.stderr
  with open(os.path.join(out, "index.json")) as f:
    assert json.load(f)["identity"]["num_images"] == 32


def test_retriever_input_mistakes_are_errors(built):
  """k=0 is not "the default", [] is not a shape error, -1 is not the last image (issue 15)."""
  _, out, *_ = built
  r = retriever.Retriever.load(out)
  for k in (0, -3, 2.5, True):
    with pytest.raises(errors.UserError, match=r"k: expected an integer >= 1"):
      r.search("a cube", k=k)
  with pytest.raises(errors.UserError, match=r"queries: expected a string or a non-empty list"):
    r.search([])
  with pytest.raises(errors.UserError, match=r"rows: expected corpus rows in \[0, 32\); found -1"):
    r.predict(["a cube"], [-1])
  with pytest.raises(errors.UserError, match=r"rows: expected corpus rows in \[0, 32\); found 32"):
    r.encode_images([0, 32])
  with pytest.raises(errors.UserError, match=r"rows: expected a list of integer corpus rows"):
    r.predict(["a cube"], [0.5])
  with pytest.raises(errors.UserError) as e:
    r.search(["a cube", 12345 * "x" + " " + 100_000 * "y", None])
  assert len(str(e.value)) < 200 and "query 2" in str(e.value)  # long queries are never echoed whole
  long_query = " ".join(["red cube"] * 20_000)
  assert len(r.search(long_query, k=3, rerank=False)[0]) == 3  # truncated to max_text_len, searched


def test_index_rows_must_still_be_the_splits_images(built):
  _, out, *_ = built
  ids = np.load(os.path.join(out, "image_ids.npy"))
  retriever._check_image_ids(out, {}, ids, ids.copy())  # pylint: disable=protected-access
  with pytest.raises(indexes.IndexMismatchError, match=r"image_ids\.npy differs .* from row 1 on"):
    retriever._check_image_ids(out, {}, ids, ids[[0, 2, 1] + list(range(3, len(ids)))])  # pylint: disable=protected-access


def test_search_cli_never_echoes_a_long_query_in_full(built):
  _, out, *_ = built
  long_query = "a " + "x" * 100_000
  res = subprocess.run([sys.executable, "-m", "rerank.search", f"--index={out}", f"--query={long_query}",
                        "--query= "], env=ENV, cwd=REPO, capture_output=True, text=True)
  assert res.returncode == 2 and "error: --query" in res.stderr and len(res.stderr) < 500, res.stderr[-500:]
  res = subprocess.run([sys.executable, "-m", "rerank.search", f"--index={out}", "--query=a cube",
                        "--show=-1"], env=ENV, cwd=REPO, capture_output=True, text=True)
  assert res.returncode == 2 and "error: --show: expected >= 1; found -1" in res.stderr, res.stderr[-500:]
  res = subprocess.run([sys.executable, "-m", "rerank.search", f"--index={out}", f"--query={long_query}",
                        "--k=3"], env=ENV, cwd=REPO, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-2000:]
  assert max(len(line) for line in res.stdout.splitlines()) < 300 and "100002 characters" in res.stdout


def test_index_without_an_identity_is_one_error(tmp_path):
  path = str(tmp_path / "idx")
  indexes.save(indexes.ExactIndex(np.eye(4, dtype=np.float32)), path, {"fingerprint": "abc"})
  with pytest.raises(indexes.IndexFormatError, match=r"index\.json: identity: expected .*found no checkpoint, dataset, split"):
    retriever.Retriever.load(path)
