"""Evaluation: bi-encoder, cross-encoder and retrieve-and-rerank, both directions.

- BE: embed every text and image once; rank the whole corpus by cosine.
- CE: score every (query, candidate) pair. That costs the corpus size per query, so it runs on
  a seeded sample of queries (`eval.ce_queries_*`; 0 = all) against the FULL corpus.
- RR: BE top-k, CE scores those k pairs, reranked by CE; the rest keep BE order.
Each row records recalls (percent), mR, RSUM, measured seconds per query and the number of
queries it was measured on. BE seconds per query = (encoding every text and image + both
searches) / all queries of both directions, since each side is the other's query set; a RR
query adds its k CE pairs to its share of that.

`evaluate` takes a scorer (`engine.DataScorer`, or any object with its `texts`, `images` and
`pairs`); `evaluate_config` runs it on `config.eval.split` (a split, a fold mean or an enlarged
corpus, `rerank.data.eval_sets`); `evaluate_workdir` restores a training workdir first
(`python -m rerank.evaluate`).
"""

import json
import time

import numpy as np

from rerank import paths
from rerank.data import datasets
from rerank.data import eval_sets
from rerank.evaluation import metrics
from rerank.indexing import indexes as index_lib
from rerank.indexing import ranking
from rerank.inference import engine
from rerank.models import modes


def _relevance(data):
  """Boolean [T, N] matrix: caption t describes image n (by image id, so merged corpora work)."""
  return data.image_ids[data.caption_image][:, None] == data.image_ids[None, :]


def _sample(n: int, size: int, seed: int) -> np.ndarray:
  if size <= 0 or size >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _row(model_name, method, k, t2i_hits, i2t_hits, seconds, queries):
  row = {"model": model_name, "method": method, "k": k}
  row.update(metrics.summarise(metrics.recall_at_k(t2i_hits), metrics.recall_at_k(i2t_hits)))
  row["seconds_per_query"] = seconds / max(queries["t2i"] + queries["i2t"], 1)
  row["queries"] = queries
  return row


def evaluate(scorer, data, mode: str, eval_cfg, seed: int = 0, model_name: str | None = None,
             methods=("BE", "CE", "RR"), log=print, query_texts=None, query_images=None,
             index_cfg=None) -> list[dict]:
  """Rows of results for every method in `methods` that `mode` supports (module docstring).

  `query_texts` / `query_images` (rows; default all) restrict the queries while the whole of
  `data` stays the corpus: enlarged test sets (`rerank.data.eval_sets.enlarge`).
  The BE first stage is the index backend `eval_cfg.index` ("exact" when absent: brute force,
  equal to plain `q @ corpus.T` ranking; "scann", "jax" or "auto"), built per direction with
  `index_cfg` (config.index: ScaNN parameters; None = chosen from the corpus size).
  """
  mode = modes.get(mode)
  model_name = model_name or mode.model_name
  rel = _relevance(data)  # [T, N]
  t_all, i_all = np.arange(data.num_texts), np.arange(data.num_images)
  q_txt = t_all if query_texts is None else np.asarray(query_texts, np.int64)
  q_img = i_all if query_images is None else np.asarray(query_images, np.int64)
  k = eval_cfg.k
  rows = []
  want_be = mode.has_be and ("BE" in methods or "RR" in methods)
  if want_be:
    t0 = time.perf_counter()
    img_emb = scorer.images(data, i_all)  # [N, H]
    t1 = time.perf_counter()
    txt_emb = scorer.texts(data, t_all)  # [T, H]
    backend = eval_cfg.get("index", "exact")
    be_t2i = index_lib.build(img_emb, backend, index_cfg).search(txt_emb, max(10, k))[0]  # [T, depth]
    be_i2t = index_lib.build(txt_emb, backend, index_cfg).search(img_emb, max(10, k))[0]  # [N, depth]
    # Both corpora are encoded once here; each is query-time work for the other direction,
    # so the whole cost is spread over all queries of both directions.
    be_seconds = time.perf_counter() - t0
    be_queries = {"t2i": len(q_txt), "i2t": len(q_img)}
    if "BE" in methods:
      rows.append(_row(model_name, "BE", None, metrics.first_hit_ranks(be_t2i[q_txt], rel[q_txt]),
                       metrics.first_hit_ranks(be_i2t[q_img], rel.T[q_img]), be_seconds,
                       be_queries))
      log(f"BE: {data.num_texts} texts, {data.num_images} images in {be_seconds:.1f}s "
          f"(images {t1 - t0:.1f}s)")
  if mode.has_ce and "CE" in methods:
    qt = q_txt[_sample(len(q_txt), eval_cfg.ce_queries_t2i, seed)]
    qi = q_img[_sample(len(q_img), eval_cfg.ce_queries_i2t, seed + 1)]
    t0 = time.perf_counter()
    s_t2i = scorer.pairs(data, np.repeat(qt, data.num_images), np.tile(i_all, len(qt)), "CE t2i")
    s_i2t = scorer.pairs(data, np.tile(t_all, len(qi)), np.repeat(qi, data.num_texts), "CE i2t")
    ce_seconds = time.perf_counter() - t0
    ce_t2i = ranking.ranking_from_scores(s_t2i.reshape(len(qt), data.num_images), 10)
    ce_i2t = ranking.ranking_from_scores(s_i2t.reshape(len(qi), data.num_texts), 10)
    rows.append(_row(model_name, "CE", None, metrics.first_hit_ranks(ce_t2i, rel[qt]),
                     metrics.first_hit_ranks(ce_i2t, rel.T[qi]), ce_seconds,
                     {"t2i": len(qt), "i2t": len(qi)}))
    log(f"CE: {len(qt)} text and {len(qi)} image queries against the full corpus in {ce_seconds:.1f}s")
  if want_be and mode.has_ce and "RR" in methods:
    qt = q_txt[_sample(len(q_txt), eval_cfg.rr_queries_t2i, seed + 2)]
    qi = q_img[_sample(len(q_img), eval_cfg.rr_queries_i2t, seed + 3)]
    t0 = time.perf_counter()
    s_t2i = scorer.pairs(data, np.repeat(qt, k), be_t2i[qt, :k].reshape(-1), "RR t2i")
    s_i2t = scorer.pairs(data, be_i2t[qi, :k].reshape(-1), np.repeat(qi, k), "RR i2t")
    rr_t2i = ranking.rerank_topk(be_t2i[qt], s_t2i.reshape(len(qt), k))
    rr_i2t = ranking.rerank_topk(be_i2t[qi], s_i2t.reshape(len(qi), k))
    rr_queries = {"t2i": len(qt), "i2t": len(qi)}
    # A RR query pays its share of the BE work plus its own k CE pairs.
    rr_seconds = (time.perf_counter() - t0) + be_seconds * (
        (len(qt) + len(qi)) / (be_queries["t2i"] + be_queries["i2t"]))
    rows.append(_row(model_name, "RR", k, metrics.first_hit_ranks(rr_t2i, rel[qt]),
                     metrics.first_hit_ranks(rr_i2t, rel.T[qi]), rr_seconds, rr_queries))
    log(f"RR: top-{k} of {len(qt)} text and {len(qi)} image queries reranked in {rr_seconds:.1f}s")
  return rows


def evaluate_config(scorer, config, tokenizer, spec: str | None = None, log=print,
                    num_images=None) -> dict:
  """The results.json dict of `spec` (default config.eval.split), its "protocol" saying how.

  `spec` may be a split (`test`), a fold mean (`test@5x1k`) or an enlarged corpus
  (`test+cc_dev:dev`); see `rerank.data.eval_sets`. `num_images` shrinks the main split.
  """
  spec = spec or config.eval.split
  sets, average = eval_sets.from_spec(config, spec, tokenizer, datasets.load_split, num_images)
  per_set = []
  for s in sets:
    log(f"evaluating on {s.name}: {s.data.num_images} images, {s.data.num_texts} texts"
        + (f" ({len(s.query_images)} image / {len(s.query_texts)} text queries)"
           if s.query_texts is not None else ""))
    per_set.append(evaluate(scorer, s.data, config.mode, config.eval, seed=config.seed, log=log,
                            query_texts=s.query_texts, query_images=s.query_images,
                            index_cfg=config.get("index")))
  first = sets[0]
  if average:
    protocol = f"mean over {len(sets)} folds of {first.data.num_images} images"
    rows = eval_sets.mean_rows(per_set)
  elif first.query_texts is not None:
    protocol = (f"enlarged corpus: queries and relevance from {spec.split('+')[0]} only, "
                f"distractors from {', '.join(spec.split('+')[1:])}")
    rows = per_set[0]
  else:
    protocol = "single split"
    rows = per_set[0]
  out = {"dataset": config.dataset.name, "split": spec, "protocol": protocol,
         "num_images": first.data.num_images, "num_texts": first.data.num_texts, "rows": rows}
  if config.dataset.get("language"):  # Multi30k: which language's captions were the queries
    out["language"] = config.dataset.language
  return out


def evaluate_workdir(config, workdir: str, latest: bool = False, log=print) -> dict:
  """Restores a training workdir (best by dev when config.eval.use_best and not `latest`, else
  the newest) and evaluates it on config.eval.split; results["checkpoint"] says which.

  Raises FileNotFoundError (no checkpoint) or ValueError (a checkpoint unlike `config`).
  """
  restored = engine.restore_workdir(workdir, latest=latest or not config.eval.use_best,
                                    config=config)
  log(f"evaluating {restored.description} parameters")
  scorer = engine.DataScorer(restored.engine(config.eval.batch_size))
  results = evaluate_config(scorer, config, restored.tokenizer, log=log,
                            num_images=config.dataset.num_test_images or None)
  results["checkpoint"] = restored.description
  return results


def results_markdown(results: dict) -> str:
  """The paper-style table: one line per (model, method), recalls in percent."""
  head = (f"{results['dataset']} / {results['split']}: {results['num_images']} images, "
          f"{results['num_texts']} texts"
          + (f" ({results['protocol']})" if results.get("protocol") else "") + "\n\n")
  lines = ["| model | method | k | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | mR | RSUM "
           "| s/query | queries (t2i/i2t) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    t, i = r["t2i"], r["i2t"]
    lines.append(
        f"| {r['model']} | {r['method']} | {r['k'] if r['k'] is not None else '-'} "
        f"| {t['R@1']:.1f} | {t['R@5']:.1f} | {t['R@10']:.1f} "
        f"| {i['R@1']:.1f} | {i['R@5']:.1f} | {i['R@10']:.1f} | {r['mR']:.1f} | {r['rsum']:.1f} "
        f"| {r['seconds_per_query']:.2e} | {r['queries']['t2i']}/{r['queries']['i2t']} |")
  return head + "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict) -> str:
  """Writes results.json and results.md atomically (local or gs://); returns the table."""
  table = results_markdown(results)
  for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("results.md", table)):
    paths.write_text(paths.join(workdir, name), text)
  return table
