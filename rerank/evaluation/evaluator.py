"""Evaluation: bi-encoder, cross-encoder and retrieve-and-rerank, both directions.

- BE: embed every text and image once; rank the whole corpus by cosine.
- CE: score every (query, candidate) pair. That costs the corpus size per query, so it runs on
  a seeded sample of queries (`eval.ce_queries_*`; 0 = all) against the FULL corpus.
- RR: BE top-k (k clamped to the corpus), the CE scores those k pairs, reordered by the CE or
  a fusion of CE and cosine (`eval.fusion`); the rest keep BE order.
Each row records recalls (percent), mR, RSUM, measured seconds per query, the number of queries
it was measured on, what its timing includes, and per direction how many queries had a tie
across a relevant item at R@1/5/10 (`ties`). Ties are broken against the relevant item
(`rerank.indexing.ranking`), so no storage order of the corpus can improve a score.
Timings are steady state: every shape runs once untimed first (`_warm_up`). BE seconds per
query = encoding the query (its share of its side's encoding) + its search; the corpus side's
encoding is the index build and is excluded, so an enlarged corpus bills nothing of its
distractors to the queries. A RR query adds its k CE pairs; a CE query its pairs with the whole
corpus. `rerank.bench` times the same quantities.

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


def _row(model_name, method, k, t2i, i2t, seconds, queries, timing):
  """One results row; t2i / i2t are (pessimistic, optimistic) first-hit ranks, each [Q]."""
  row = {"model": model_name, "method": method, "k": k}
  row.update(metrics.summarise(metrics.recall_at_k(t2i[0]), metrics.recall_at_k(i2t[0])))
  row["seconds_per_query"] = seconds / max(queries["t2i"] + queries["i2t"], 1)
  row["queries"] = queries
  row["ties"] = {"t2i": metrics.tied_hits(*t2i), "i2t": metrics.tied_hits(*i2t)}
  row["timing"] = timing
  return row


# What each row's seconds_per_query holds: the same quantities `rerank.bench` times per query.
TIMING = {
    "BE": {"includes": ["query encoding", "search"],
           "excludes": ["compilation", "index build (encoding the corpus side)"]},
    "CE": {"includes": ["CE pairs (query x every corpus item)"], "excludes": ["compilation"]},
    "RR": {"includes": ["query encoding", "search", "CE pairs (k per query)", "reorder"],
           "excludes": ["compilation", "index build (encoding the corpus side)"]},
}


def _timed(clock, fn):
  """(fn(), seconds): the clock is read right before and right after, nothing else between."""
  t0 = clock()
  out = fn()
  return out, clock() - t0


def _bucket_rows(data, rows) -> np.ndarray:
  """One text row per padded text width the engine can compile (`engine.trim_text`)."""
  rows = np.asarray(rows, np.int64)
  lengths = np.maximum(data.text_mask[rows].sum(axis=1), 1)
  widths = np.minimum(-(-lengths // engine.TEXT_BUCKET) * engine.TEXT_BUCKET, data.token_ids.shape[1])
  _, first = np.unique(widths, return_index=True)
  return rows[first]


def _warm_up(scorer, data, part: str) -> None:
  """Runs every shape a timed section will use once, so compilation stays out of the timers.

  A batch is padded to the engine's batch size and trimmed to its longest text rounded up to
  `engine.TEXT_BUCKET`, so one call per text width (and one image call) compiles them all.
  """
  reps = _bucket_rows(data, np.arange(data.num_texts))
  if part == "BE":
    scorer.images(data, np.arange(min(1, data.num_images)))
    for r in reps:
      scorer.texts(data, [r])
  else:  # the CE: pairs of every text width (regions have one shape)
    for r in reps:
      scorer.pairs(data, [r], [0])


def _search(index, queries, depth: int, clock, warm_up: bool):
  """((ids, scores) [Q, depth], seconds) of a search after one untimed warm-up search."""
  if warm_up and len(queries):
    index.search(queries[:1], depth)
  return _timed(clock, lambda: index.search(queries, depth))


def _rr_ranks(be, relevant, fused, kk: int):
  """RR (pessimistic, optimistic) ranks: ties inside the reranked top-kk go against the relevant.

  `be` is a direction's settled BE (ids, scores, pessimistic, optimistic) of the RR queries;
  `fused` [Q, kk] the fused scores of its top kk. A relevant item outside the top kk keeps its
  BE rank; had it tied into the top kk (BE optimistic rank < kk) it could have reached rank 0.
  """
  ids, _, be_pess, be_opt = be
  rel_k = np.take_along_axis(relevant, np.maximum(ids[:, :kk], 0), axis=1) & (ids[:, :kk] >= 0)
  inside = rel_k.any(axis=1)
  fused = np.where(ids[:, :kk] >= 0, fused, -np.inf)  # missing neighbours rank last
  pess, opt = ranking.tie_ranks(fused, rel_k)
  return (np.where(inside, pess, be_pess),
          np.where(inside, opt, np.where(be_opt < kk, 0, be_opt)))


def _sum_ties(rows, per_set):
  """Fold means keep the first fold's tie counts; a tie count is a sum over all folds."""
  for i, row in enumerate(rows):
    row["ties"] = {d: {c: sum(fold[i]["ties"][d][c] for fold in per_set) for c in row["ties"][d]}
                   for d in row["ties"]}
  return rows


def evaluate(scorer, data, mode: str, eval_cfg, seed: int = 0, model_name: str | None = None,
             methods=("BE", "CE", "RR"), log=print, query_texts=None, query_images=None,
             index_cfg=None, clock=time.perf_counter, warm_up: bool = True) -> list[dict]:
  """Rows of results for every method in `methods` that `mode` supports (module docstring).

  `query_texts` / `query_images` (rows; default all) restrict the queries while the whole of
  `data` stays the corpus: enlarged test sets (`rerank.data.eval_sets.enlarge`).
  The BE first stage is the index backend `eval_cfg.index` ("exact" when absent: brute force,
  equal to plain `q @ corpus.T` ranking; "scann", "jax" or "auto"), built per direction with
  `index_cfg` (config.index: ScaNN parameters; None = chosen from the corpus size).
  RR orders its top k by `eval_cfg.fusion` ("standard" = CE alone when absent) with weight
  `eval_cfg.fusion_weight` (`rerank.indexing.ranking.fuse`). `clock` times the sections;
  `warm_up` (default) runs every shape once before its timer starts.
  """
  mode = modes.get(mode)
  model_name = model_name or mode.model_name
  rel = _relevance(data)  # [T, N]
  t_all, i_all = np.arange(data.num_texts), np.arange(data.num_images)
  q_txt = t_all if query_texts is None else np.asarray(query_texts, np.int64)
  q_img = i_all if query_images is None else np.asarray(query_images, np.int64)
  k = eval_cfg.k
  fusion = ranking.canonical_fusion(eval_cfg.get("fusion", "standard"))
  weight = float(eval_cfg.get("fusion_weight", 0.0))
  rows = []
  want_be = mode.has_be and ("BE" in methods or "RR" in methods)
  if want_be:
    if warm_up:
      _warm_up(scorer, data, "BE")
    img_emb, img_s = _timed(clock, lambda: scorer.images(data, i_all))  # [N, H]
    txt_emb, txt_s = _timed(clock, lambda: scorer.texts(data, t_all))  # [T, H]
    backend = eval_cfg.get("index", "exact")
    depth = max(10, k)
    (t2i, t2i_s), (i2t, i2t_s) = (
        _search(index_lib.build(corpus, backend, index_cfg), queries, depth, clock, warm_up)
        for corpus, queries in ((img_emb, txt_emb[q_txt]), (txt_emb, img_emb[q_img])))
    # Ties against the relevant item (rerank.indexing.ranking); bookkeeping, not timed.
    be_t2i = ranking.settle_ties(*t2i, rel[q_txt], lambda r: txt_emb[q_txt[r]] @ img_emb.T)
    be_i2t = ranking.settle_ties(*i2t, rel.T[q_img], lambda r: img_emb[q_img[r]] @ txt_emb.T)
    # A query pays for encoding itself (its share of its side's encoding) and its search; the
    # other side's encoding is the index build, done once before any query (also for the
    # distractors of an enlarged corpus, which are never queries).
    per_query = {"t2i": txt_s / max(data.num_texts, 1) + t2i_s / max(len(q_txt), 1),
                 "i2t": img_s / max(data.num_images, 1) + i2t_s / max(len(q_img), 1)}
    be_queries = {"t2i": len(q_txt), "i2t": len(q_img)}
    be_seconds = sum(per_query[d] * be_queries[d] for d in be_queries)
    if "BE" in methods:
      rows.append(_row(model_name, "BE", None, be_t2i[2:], be_i2t[2:], be_seconds, be_queries,
                       TIMING["BE"]))
      log(f"BE: {data.num_texts} texts, {data.num_images} images encoded in "
          f"{txt_s + img_s:.1f}s (images {img_s:.1f}s), searched in {t2i_s + i2t_s:.1f}s")
  if mode.has_ce and ("CE" in methods or (want_be and "RR" in methods)) and warm_up:
    _warm_up(scorer, data, "CE")
  if mode.has_ce and "CE" in methods:
    qt = q_txt[_sample(len(q_txt), eval_cfg.ce_queries_t2i, seed)]
    qi = q_img[_sample(len(q_img), eval_cfg.ce_queries_i2t, seed + 1)]
    s_t2i, t2i_s = _timed(clock, lambda: scorer.pairs(
        data, np.repeat(qt, data.num_images), np.tile(i_all, len(qt)), "CE t2i"))
    s_i2t, i2t_s = _timed(clock, lambda: scorer.pairs(
        data, np.tile(t_all, len(qi)), np.repeat(qi, data.num_texts), "CE i2t"))
    ce_seconds = t2i_s + i2t_s
    rows.append(_row(model_name, "CE", None,
                     ranking.tie_ranks(s_t2i.reshape(len(qt), data.num_images), rel[qt]),
                     ranking.tie_ranks(s_i2t.reshape(len(qi), data.num_texts), rel.T[qi]),
                     ce_seconds, {"t2i": len(qt), "i2t": len(qi)}, TIMING["CE"]))
    log(f"CE: {len(qt)} text and {len(qi)} image queries against the full corpus in {ce_seconds:.1f}s")
  if want_be and mode.has_ce and "RR" in methods:
    rows.append(_rr_row(scorer, data, eval_cfg, seed, model_name, rel, q_txt, q_img,
                        (be_t2i, be_i2t), per_query, fusion, weight, clock, log))
  return rows


def _rr_row(scorer, data, eval_cfg, seed, model_name, rel, q_txt, q_img, be, per_query, fusion,
            weight, clock, log):
  """The RR row: the CE scores each query's BE top k (clamped to the corpus), fused, reordered.

  k larger than a direction's corpus reranks the whole corpus; row["k_effective"] says how
  many candidates each direction reranked.
  """
  k = eval_cfg.k
  pos_t = np.full(data.num_texts, -1)
  pos_t[q_txt] = np.arange(len(q_txt))
  pos_i = np.full(data.num_images, -1)
  pos_i[q_img] = np.arange(len(q_img))
  qt = q_txt[_sample(len(q_txt), eval_cfg.rr_queries_t2i, seed + 2)]
  qi = q_img[_sample(len(q_img), eval_cfg.rr_queries_i2t, seed + 3)]
  be_t2i = tuple(x[pos_t[qt]] for x in be[0])  # the RR queries' BE (ids, scores, ranks)
  be_i2t = tuple(x[pos_i[qi]] for x in be[1])
  kk_t2i, kk_i2t = min(k, be_t2i[0].shape[1]), min(k, be_i2t[0].shape[1])
  # Missing neighbours (-1, approximate indexes) are scored as candidate 0 and never relevant.
  s_t2i, t2i_s = _timed(clock, lambda: scorer.pairs(
      data, np.repeat(qt, kk_t2i), np.maximum(be_t2i[0][:, :kk_t2i], 0).reshape(-1), "RR t2i"))
  s_i2t, i2t_s = _timed(clock, lambda: scorer.pairs(
      data, np.maximum(be_i2t[0][:, :kk_i2t], 0).reshape(-1), np.repeat(qi, kk_i2t), "RR i2t"))
  fused_t2i = ranking.fuse(s_t2i.reshape(len(qt), kk_t2i), be_t2i[1][:, :kk_t2i], fusion, weight)
  fused_i2t = ranking.fuse(s_i2t.reshape(len(qi), kk_i2t), be_i2t[1][:, :kk_i2t], fusion, weight)
  queries = {"t2i": len(qt), "i2t": len(qi)}
  # A RR query pays its BE work (per direction) plus its own k CE pairs.
  seconds = t2i_s + i2t_s + sum(per_query[d] * queries[d] for d in queries)
  row = _row(model_name, "RR", k, _rr_ranks(be_t2i, rel[qt], fused_t2i, kk_t2i),
             _rr_ranks(be_i2t, rel.T[qi], fused_i2t, kk_i2t), seconds, queries, TIMING["RR"])
  row["k_effective"] = {"t2i": kk_t2i, "i2t": kk_i2t}
  row["fusion"] = {"mode": fusion, "weight": weight}
  log(f"RR: top-{k} of {len(qt)} text and {len(qi)} image queries reranked in {seconds:.1f}s")
  return row


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
    rows = _sum_ties(eval_sets.mean_rows(per_set), per_set)
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
  return head + "\n".join(lines) + "\n" + _ties_note(results["rows"])


def _ties_note(rows) -> str:
  """A line under the table naming the rows whose recalls a tie decided (else nothing)."""
  tied = [f"{r['model']} {r['method']} {d} {c}: {n}" for r in rows
          for d, counts in r.get("ties", {}).items() for c, n in counts.items() if n]
  if not tied:
    return ""
  return ("\nQueries that miss only because a tie went against their relevant item (ties are "
          "broken against it): " + ", ".join(tied) + "\n")


def write_results(workdir: str, results: dict) -> str:
  """Writes results.json and results.md atomically (local or gs://); returns the table."""
  table = results_markdown(results)
  for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("results.md", table)):
    paths.write_text(paths.join(workdir, name), text)
  return table
