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
`pairs`); over a `sharded.ShardedEngine` the work is split between all devices and processes
(each process scores a share of the CE/RR queries; `pairs_scored` records the pairs per
process) and the BE first stage searches the corpus in per-process shards. The final
evaluation keeps finished parts on disk (`rerank.evaluation.parts`) so it survives preemption.
`evaluate_config` runs it on `config.eval.split` (a split, a fold mean or an enlarged corpus,
`rerank.data.eval_sets`); `evaluate_workdir` restores a training workdir onto the config's
mesh first (`python -m rerank.evaluate`).
"""

import copy
import json
import time

import jax
import numpy as np

from rerank import paths
from rerank.data import datasets
from rerank.data import eval_sets
from rerank.evaluation import metrics
from rerank.evaluation import parts as parts_lib
from rerank.indexing import ranking
from rerank.inference import engine
from rerank.inference import sharded
from rerank.models import modes


# CE pairs per stored part of the final evaluation (eval.part_pairs, where set): minutes of work
# on one accelerator, so a preemption loses little and the directory holds few files.
DEFAULT_PART_PAIRS = 1 << 17


def _relevance(data):
  """Boolean [T, N] matrix: caption t describes image n (by image id, so merged corpora work)."""
  return data.image_ids[data.caption_image][:, None] == data.image_ids[None, :]


def _sample(n: int, size: int, seed: int) -> np.ndarray:
  if size <= 0 or size >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _row(model_name, method, k, t2i, i2t, seconds, queries, timing, pairs_scored):
  """One results row; t2i / i2t are (pessimistic, optimistic) first-hit ranks, each [Q]."""
  row = {"model": model_name, "method": method, "k": k}
  row.update(metrics.summarise(metrics.recall_at_k(t2i[0]), metrics.recall_at_k(i2t[0])))
  row["seconds_per_query"] = seconds / max(queries["t2i"] + queries["i2t"], 1)
  row["queries"] = queries
  row["ties"] = {"t2i": metrics.tied_hits(*t2i), "i2t": metrics.tied_hits(*i2t)}
  row["timing"] = timing
  row["pairs_scored"] = [int(c) for c in pairs_scored]  # CE pairs per process
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


def _search(corpus, queries, depth: int, backend: str, index_cfg, clock, warm_up: bool):
  """((ids, scores) [Q, depth], seconds) of the first-stage search after one untimed warm-up.

  Each process indexes its share of the corpus (`sharded.build_index`; untimed: the index
  build) and the per-share top-depth lists are merged.
  """
  index = sharded.build_index(corpus, backend, index_cfg)
  if warm_up and len(queries):
    sharded.search_index(index, queries[:1], depth)
  return _timed(clock, lambda: sharded.search_index(index, queries, depth))


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


def _sum_counts(*counts):
  return np.sum(counts, axis=0).tolist()


def _score_queries(scorer, data, parts, name, queries, per_query, pairs_of, eval_cfg, desc,
                   clock=time.perf_counter):
  """CE scores [Q, per_query] of each query's pairs, the pairs each process scored, seconds.

  `pairs_of(query rows)` -> (caption rows, image rows) of their pairs, query by query. The
  queries are scored in stored parts of about eval.part_pairs pairs (all at once when nothing
  is stored); each part splits its queries evenly between the processes, so a part holds a
  multiple of the process count.
  """
  if parts.dir is None or not len(queries):
    blocks = [queries]
  else:
    size = max(1, eval_cfg.get("part_pairs", DEFAULT_PART_PAIRS) // max(per_query, 1))
    size = -(-size // jax.process_count()) * jax.process_count()
    blocks = [queries[a:a + size] for a in range(0, len(queries), size)]
  scores, counts, seconds = [], [], 0.0
  for j, block in enumerate(blocks):
    part = parts.get(f"{name}.{j:05d}", parts_lib.timed(
        lambda b=block: _score_pairs(scorer, data, *pairs_of(b), len(b), desc), clock))
    scores.append(part["scores"])
    counts.append(part["counts"])
    seconds += float(part["seconds"])
  return (np.concatenate(scores).reshape(len(queries), per_query), _sum_counts(*counts), seconds)


def _score_pairs(scorer, data, texts, images, groups, desc) -> dict:
  """{"scores": [P] CE logits, "counts": pairs per process}; a sharded engine splits the
  pairs group by group between the processes, any other scorer scores them all."""
  eng = getattr(scorer, "engine", None)
  if isinstance(eng, sharded.ShardedEngine):
    return {"scores": eng.score_pairs(*engine.text_rows(data, texts),
                                      *engine.image_rows(data, images), desc=desc, groups=groups),
            "counts": np.asarray(eng.last_counts)}
  return {"scores": scorer.pairs(data, texts, images, desc),
          "counts": np.full(jax.process_count(), len(texts))}


def evaluate(scorer, data, mode: str, eval_cfg, seed: int = 0, model_name: str | None = None,
             methods=("BE", "CE", "RR"), log=print, query_texts=None, query_images=None,
             index_cfg=None, parts=None, clock=time.perf_counter,
             warm_up: bool = True) -> list[dict]:
  """Rows of results for every method in `methods` that `mode` supports (module docstring).

  `query_texts` / `query_images` (rows; default all) restrict the queries while the whole of
  `data` stays the corpus: enlarged test sets (`rerank.data.eval_sets.enlarge`).
  The BE first stage is the index backend `eval_cfg.index` ("exact" when absent: brute force,
  equal to plain `q @ corpus.T` ranking; "scann", "jax" or "auto"), built per direction with
  `index_cfg` (config.index: ScaNN parameters; None = chosen from the corpus size).
  RR orders its top k by `eval_cfg.fusion` ("standard" = CE alone when absent) with weight
  `eval_cfg.fusion_weight` (`rerank.indexing.ranking.fuse`). `clock` times the sections;
  `warm_up` (default) runs every shape once before its timer starts.
  `parts` (`rerank.evaluation.parts.Parts`) keeps finished embeddings and score chunks and
  stops between them on SIGTERM (raising `parts.Interrupted`); default: nothing kept.
  """
  mode = modes.get(mode)
  parts = parts or parts_lib.Parts()  # default: nothing stored
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
    img = parts.get("be_images", parts_lib.timed(lambda: {"emb": scorer.images(data, i_all)}, clock))
    txt = parts.get("be_texts", parts_lib.timed(lambda: {"emb": scorer.texts(data, t_all)}, clock))
    img_emb, txt_emb = img["emb"], txt["emb"]  # [N, H], [T, H]
    img_s, txt_s = float(img["seconds"]), float(txt["seconds"])
    backend = eval_cfg.get("index", "exact")
    depth = max(10, k)
    (t2i, t2i_s), (i2t, i2t_s) = (
        _search(corpus, queries, depth, backend, index_cfg, clock, warm_up)
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
                       TIMING["BE"], [0] * jax.process_count()))
      log(f"BE: {data.num_texts} texts, {data.num_images} images encoded in "
          f"{txt_s + img_s:.1f}s (images {img_s:.1f}s), searched in {t2i_s + i2t_s:.1f}s")
  if mode.has_ce and ("CE" in methods or (want_be and "RR" in methods)) and warm_up:
    _warm_up(scorer, data, "CE")
  if mode.has_ce and "CE" in methods:
    qt = q_txt[_sample(len(q_txt), eval_cfg.ce_queries_t2i, seed)]
    qi = q_img[_sample(len(q_img), eval_cfg.ce_queries_i2t, seed + 1)]
    n, t = data.num_images, data.num_texts
    s_t2i, c_t2i, t2i_s = _score_queries(
        scorer, data, parts, "ce_t2i", qt, n, lambda q: (np.repeat(q, n), np.tile(i_all, len(q))),
        eval_cfg, "CE t2i", clock)
    s_i2t, c_i2t, i2t_s = _score_queries(
        scorer, data, parts, "ce_i2t", qi, t, lambda q: (np.tile(t_all, len(q)), np.repeat(q, t)),
        eval_cfg, "CE i2t", clock)
    ce_seconds = t2i_s + i2t_s
    rows.append(_row(model_name, "CE", None, ranking.tie_ranks(s_t2i, rel[qt]),
                     ranking.tie_ranks(s_i2t, rel.T[qi]), ce_seconds,
                     {"t2i": len(qt), "i2t": len(qi)}, TIMING["CE"], _sum_counts(c_t2i, c_i2t)))
    log(f"CE: {len(qt)} text and {len(qi)} image queries against the full corpus in {ce_seconds:.1f}s")
  if want_be and mode.has_ce and "RR" in methods:
    rows.append(_rr_row(scorer, data, eval_cfg, seed, model_name, rel, q_txt, q_img,
                        (be_t2i, be_i2t), per_query, fusion, weight, clock, log, parts))
  return rows


def _rr_row(scorer, data, eval_cfg, seed, model_name, rel, q_txt, q_img, be, per_query, fusion,
            weight, clock, log, parts):
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
  ids_t2i, ids_i2t = be[0][0], be[1][0]  # settled BE ids [Q, depth] of all BE queries
  kk_t2i, kk_i2t = min(k, ids_t2i.shape[1]), min(k, ids_i2t.shape[1])
  # Missing neighbours (-1, approximate indexes) are scored as candidate 0 and never relevant.
  s_t2i, c_t2i, t2i_s = _score_queries(
      scorer, data, parts, "rr_t2i", qt, kk_t2i,
      lambda q: (np.repeat(q, kk_t2i), np.maximum(ids_t2i[pos_t[q], :kk_t2i], 0).reshape(-1)),
      eval_cfg, "RR t2i", clock)
  s_i2t, c_i2t, i2t_s = _score_queries(
      scorer, data, parts, "rr_i2t", qi, kk_i2t,
      lambda q: (np.maximum(ids_i2t[pos_i[q], :kk_i2t], 0).reshape(-1), np.repeat(q, kk_i2t)),
      eval_cfg, "RR i2t", clock)
  be_t2i = tuple(x[pos_t[qt]] for x in be[0])  # the RR queries' BE (ids, scores, ranks)
  be_i2t = tuple(x[pos_i[qi]] for x in be[1])
  fused_t2i = ranking.fuse(s_t2i, be_t2i[1][:, :kk_t2i], fusion, weight)
  fused_i2t = ranking.fuse(s_i2t, be_i2t[1][:, :kk_i2t], fusion, weight)
  queries = {"t2i": len(qt), "i2t": len(qi)}
  # A RR query pays its BE work (per direction) plus its own k CE pairs.
  seconds = t2i_s + i2t_s + sum(per_query[d] * queries[d] for d in queries)
  row = _row(model_name, "RR", k, _rr_ranks(be_t2i, rel[qt], fused_t2i, kk_t2i),
             _rr_ranks(be_i2t, rel.T[qi], fused_i2t, kk_i2t), seconds, queries, TIMING["RR"],
             _sum_counts(c_t2i, c_i2t))
  row["k_effective"] = {"t2i": kk_t2i, "i2t": kk_i2t}
  row["fusion"] = {"mode": fusion, "weight": weight}
  log(f"RR: top-{k} of {len(qt)} text and {len(qi)} image queries reranked in {seconds:.1f}s")
  return row


def dev_config(eval_cfg):
  """config.eval for the dev evaluation during training: `eval.dev_ce_queries_t2i` / `_i2t`
  (where >= 0; -1 = unset) replace the CE query sample, as the authors evaluate their CE on a
  small dev sample; everything else as the final evaluation."""
  cfg = copy.deepcopy(eval_cfg)
  for d in ("t2i", "i2t"):
    if eval_cfg.get(f"dev_ce_queries_{d}", -1) >= 0:
      cfg[f"ce_queries_{d}"] = eval_cfg[f"dev_ce_queries_{d}"]
  return cfg


def evaluate_config(scorer, config, tokenizer, spec: str | None = None, log=print,
                    num_images=None, parts=None) -> dict:
  """The results.json dict of `spec` (default config.eval.split), its "protocol" saying how.

  `spec` may be a split (`test`), a fold mean (`test@5x1k`) or an enlarged corpus
  (`test+cc_dev:dev`); see `rerank.data.eval_sets`. `num_images` shrinks the main split.
  `parts`: as `evaluate` (raises `parts.Interrupted` on SIGTERM).
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
                            index_cfg=config.get("index"),
                            parts=parts.sub(s.name) if parts is not None and len(sets) > 1
                            else parts))
  first = sets[0]
  if average:
    protocol = f"mean over {len(sets)} folds of {first.data.num_images} images"
    rows = _sum_ties(eval_sets.mean_rows(per_set), per_set)
    for i, row in enumerate(rows):  # the work of every fold
      row["pairs_scored"] = _sum_counts(*[fold[i]["pairs_scored"] for fold in per_set])
  elif first.query_texts is not None:
    protocol = (f"enlarged corpus: queries and relevance from {spec.split('+')[0]} only, "
                f"distractors from {', '.join(spec.split('+')[1:])}")
    rows = per_set[0]
  else:
    protocol = "single split"
    rows = per_set[0]
  out = {"dataset": config.dataset.name, "split": spec, "protocol": protocol,
         "num_images": first.data.num_images, "num_texts": first.data.num_texts,
         "processes": jax.process_count(), "devices": jax.device_count(), "rows": rows}
  if config.dataset.get("language"):  # Multi30k: which language's captions were the queries
    out["language"] = config.dataset.language
  return out


def evaluate_workdir(config, workdir: str, latest: bool = False, log=print, out: str | None = None,
                     stop=None) -> dict:
  """Restores a training workdir (best by dev when config.eval.use_best and not `latest`, else
  the newest) on the config's mesh and evaluates it on config.eval.split over every device;
  results["checkpoint"] says which.

  With `out`, finished parts are kept under out/eval_parts/ while it runs (a rerun after
  `parts.Interrupted`, raised when `stop()` turns True, reuses them), then results.json and
  results.md are written to `out` (by process 0) and the parts removed.
  Raises FileNotFoundError (no checkpoint) or ValueError (a checkpoint unlike `config`).
  """
  restored = sharded.restore_workdir(workdir, latest=latest or not config.eval.use_best,
                                     config=config)
  log(f"evaluating {restored.description} parameters on {jax.device_count()} device(s), "
      f"{jax.process_count()} process(es)")
  scorer = engine.DataScorer(sharded.engine_for(restored, config.eval.batch_size))
  store = final_parts(out, config, restored.description, stop, log) if out else None
  results = evaluate_config(scorer, config, restored.tokenizer, log=log,
                            num_images=config.dataset.num_test_images or None, parts=store)
  results["checkpoint"] = restored.description
  if out:
    if jax.process_index() == 0:
      write_results(out, results)
    store.discard()
  return results


def final_parts(root: str, config, which: str, stop=None, log=print) -> parts_lib.Parts:
  """The parts store of a final evaluation of checkpoint `which` on config.eval.split."""
  fields = {"checkpoint": which, "mode": config.mode, "seed": config.seed,
            "eval": config.eval.to_dict(), "dataset": config.dataset.to_dict(),
            "index": config.index.to_dict() if config.get("index") else None}
  return parts_lib.Parts(root, fields, stop, log)


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
