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
import os
import time

import jax
import numpy as np

from rerank.data import datasets
from rerank.data import eval_sets
from rerank.evaluation import metrics
from rerank.evaluation import parts as parts_lib
from rerank.indexing import ranking
from rerank.inference import engine
from rerank.inference import sharded
from rerank.models import modes


# CE pairs per stored part of the final evaluation (eval.part_pairs overrides): minutes of work
# on one accelerator, so a preemption loses little and the directory holds few files.
DEFAULT_PART_PAIRS = 1 << 17


def _relevance(data):
  """Boolean [T, N] matrix: caption t describes image n (by image id, so merged corpora work)."""
  return data.image_ids[data.caption_image][:, None] == data.image_ids[None, :]


def _sample(n: int, size: int, seed: int) -> np.ndarray:
  if size <= 0 or size >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _row(model_name, method, k, t2i_hits, i2t_hits, seconds, queries, pairs_scored):
  row = {"model": model_name, "method": method, "k": k}
  row.update(metrics.summarise(metrics.recall_at_k(t2i_hits), metrics.recall_at_k(i2t_hits)))
  row["seconds_per_query"] = seconds / max(queries["t2i"] + queries["i2t"], 1)
  row["queries"] = queries
  row["pairs_scored"] = [int(c) for c in pairs_scored]  # CE pairs per process
  return row


def _sum_counts(*counts):
  return np.sum(counts, axis=0).tolist()


def _score_queries(scorer, data, parts, name, queries, per_query, pairs_of, eval_cfg, desc):
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
        lambda b=block: _score_pairs(scorer, data, *pairs_of(b), len(b), desc)))
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
             index_cfg=None, parts=None) -> list[dict]:
  """Rows of results for every method in `methods` that `mode` supports (module docstring).

  `query_texts` / `query_images` (rows; default all) restrict the queries while the whole of
  `data` stays the corpus: enlarged test sets (`rerank.data.eval_sets.enlarge`).
  The BE first stage is the index backend `eval_cfg.index` ("exact" when absent: brute force,
  equal to plain `q @ corpus.T` ranking; "scann", "jax" or "auto"), built per direction with
  `index_cfg` (config.index: ScaNN parameters; None = chosen from the corpus size).
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
  rows = []
  want_be = mode.has_be and ("BE" in methods or "RR" in methods)
  if want_be:
    img = parts.get("be_images", parts_lib.timed(lambda: {"emb": scorer.images(data, i_all)}))
    txt = parts.get("be_texts", parts_lib.timed(lambda: {"emb": scorer.texts(data, t_all)}))
    img_emb, txt_emb = img["emb"], txt["emb"]  # [N, H], [T, H]
    t0 = time.perf_counter()
    backend = eval_cfg.get("index", "exact")
    # Each process indexes its share of the corpus; the per-share top-k are merged.
    be_t2i = sharded.search(img_emb, txt_emb, max(10, k), backend, index_cfg)  # [T, depth]
    be_i2t = sharded.search(txt_emb, img_emb, max(10, k), backend, index_cfg)  # [N, depth]
    # Both corpora are encoded once here; each is query-time work for the other direction,
    # so the whole cost is spread over all queries of both directions.
    be_seconds = float(img["seconds"] + txt["seconds"]) + time.perf_counter() - t0
    be_queries = {"t2i": len(q_txt), "i2t": len(q_img)}
    if "BE" in methods:
      rows.append(_row(model_name, "BE", None, metrics.first_hit_ranks(be_t2i[q_txt], rel[q_txt]),
                       metrics.first_hit_ranks(be_i2t[q_img], rel.T[q_img]), be_seconds,
                       be_queries, [0] * jax.process_count()))
      log(f"BE: {data.num_texts} texts, {data.num_images} images in {be_seconds:.1f}s "
          f"(images {float(img['seconds']):.1f}s)")
  if mode.has_ce and "CE" in methods:
    qt = q_txt[_sample(len(q_txt), eval_cfg.ce_queries_t2i, seed)]
    qi = q_img[_sample(len(q_img), eval_cfg.ce_queries_i2t, seed + 1)]
    n, t = data.num_images, data.num_texts
    s_t2i, c_t2i, sec_t2i = _score_queries(
        scorer, data, parts, "ce_t2i", qt, n, lambda q: (np.repeat(q, n), np.tile(i_all, len(q))),
        eval_cfg, "CE t2i")
    s_i2t, c_i2t, sec_i2t = _score_queries(
        scorer, data, parts, "ce_i2t", qi, t, lambda q: (np.tile(t_all, len(q)), np.repeat(q, t)),
        eval_cfg, "CE i2t")
    ce_seconds = sec_t2i + sec_i2t
    ce_t2i = ranking.ranking_from_scores(s_t2i.reshape(len(qt), data.num_images), 10)
    ce_i2t = ranking.ranking_from_scores(s_i2t.reshape(len(qi), data.num_texts), 10)
    rows.append(_row(model_name, "CE", None, metrics.first_hit_ranks(ce_t2i, rel[qt]),
                     metrics.first_hit_ranks(ce_i2t, rel.T[qi]), ce_seconds,
                     {"t2i": len(qt), "i2t": len(qi)}, _sum_counts(c_t2i, c_i2t)))
    log(f"CE: {len(qt)} text and {len(qi)} image queries against the full corpus in {ce_seconds:.1f}s")
  if want_be and mode.has_ce and "RR" in methods:
    qt = q_txt[_sample(len(q_txt), eval_cfg.rr_queries_t2i, seed + 2)]
    qi = q_img[_sample(len(q_img), eval_cfg.rr_queries_i2t, seed + 3)]
    s_t2i, c_t2i, sec_t2i = _score_queries(
        scorer, data, parts, "rr_t2i", qt, k, lambda q: (np.repeat(q, k), be_t2i[q, :k].reshape(-1)),
        eval_cfg, "RR t2i")
    s_i2t, c_i2t, sec_i2t = _score_queries(
        scorer, data, parts, "rr_i2t", qi, k, lambda q: (be_i2t[q, :k].reshape(-1), np.repeat(q, k)),
        eval_cfg, "RR i2t")
    rr_t2i = ranking.rerank_topk(be_t2i[qt], s_t2i.reshape(len(qt), k))
    rr_i2t = ranking.rerank_topk(be_i2t[qi], s_i2t.reshape(len(qi), k))
    rr_queries = {"t2i": len(qt), "i2t": len(qi)}
    # A RR query pays its share of the BE work plus its own k CE pairs.
    rr_seconds = sec_t2i + sec_i2t + be_seconds * (
        (len(qt) + len(qi)) / (be_queries["t2i"] + be_queries["i2t"]))
    rows.append(_row(model_name, "RR", k, metrics.first_hit_ranks(rr_t2i, rel[qt]),
                     metrics.first_hit_ranks(rr_i2t, rel.T[qi]), rr_seconds, rr_queries,
                     _sum_counts(c_t2i, c_i2t)))
    log(f"RR: top-{k} of {len(qt)} text and {len(qi)} image queries reranked in {rr_seconds:.1f}s")
  return rows


def dev_config(eval_cfg):
  """config.eval for the dev evaluation during training: `eval.dev_ce_queries_t2i` / `_i2t`
  (where a config sets them) replace the CE query sample, as the authors evaluate their CE on
  a small dev sample; everything else as the final evaluation."""
  cfg = copy.deepcopy(eval_cfg)
  for d in ("t2i", "i2t"):
    if eval_cfg.get(f"dev_ce_queries_{d}") is not None:
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
    rows = eval_sets.mean_rows(per_set)
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
  return head + "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict) -> str:
  """Writes results.json and results.md atomically (temp file, then rename); returns the table."""
  table = results_markdown(results)
  for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("results.md", table)):
    tmp = os.path.join(workdir, f".{name}.tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, name))
  return table
