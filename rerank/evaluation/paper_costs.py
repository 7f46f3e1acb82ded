"""The paper's cost tables measured on this device, beside its published figures.

Table 3: latency of one text query against a corpus of 50,000 images. Table 4: the time to
evaluate MSCOCO 5k test (25,000 captions x 5,000 images, both directions, embeddings not cached).
Each for BE (bi-encoder retrieval), RR (the paper's "Coop": the BE top k reranked by the CE) and
CE (the cross-encoder over every pair). `rerank.bench` runs `measure` and prints `markdown`.

What is timed, per method:
- Table 3: BE = encode the query (batch of one) + exact search over 50k unit vectors; RR = BE +
  the jitted rerank of its k pairs; CE = the 50k (query, image) pairs, in batches.
- Table 4: BE = encode 25,000 captions and 5,000 images (batches) + build and search both
  directions exactly (top max(10, k)); RR = BE + (25,000 + 5,000) x k pairs; CE = the 125M pairs
  of the caption x image score matrix, scored once (both directions rank the same matrix; our
  evaluator scores it once per direction, twice this).
Steady state only: every jitted shape is called once before it is timed. Each kind of batched
work (texts, images, pairs) is timed on one batch; a workload that would take at most `budget`
seconds is then timed in full, a larger one is scaled from the batch (ceil(n / batch) padded
batches, as the engine runs them) and marked extrapolated.

Inputs are the paper's lengths: 72 text tokens (70 wordpieces + 2 specials), every one real (an
upper bound: most captions are shorter), and 50 regions of 2054 features, all present. Token ids
and features are random, and so are the model's weights and the corpus embeddings searched: the
cost of a dense forward pass or an exact search does not depend on the values.
"""

import dataclasses
import math
import time

import jax
import numpy as np

from rerank.data import batches
from rerank.evaluation import paper_numbers
from rerank.indexing import indexes as index_lib
from rerank.inference import engine as engine_lib
from rerank.inference import reranker as rerank_lib

LATENCY_IMAGES = 50_000  # Table 3's corpus
COCO5K_TEXTS, COCO5K_IMAGES = 25_000, 5_000  # Table 4's test set
TEXT_LEN, REGIONS = 72, 50  # the paper's input lengths (OSCAR: 70 wordpieces + 2; 50 regions)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One measured cost: seconds, and whether all of it ran (False: partly extrapolated)."""
  seconds: float
  measured: bool


def timed(fn, repeats: int = 3) -> float:
  """Median wall seconds of fn() after one untimed call (compilation excluded)."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _once(fn) -> float:
  """Wall seconds of one call (NumPy work: nothing to compile)."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _tiled(x: np.ndarray, n: int) -> batches.LazyRows:
  """n rows cycling through x's rows, built one batch at a time (5k images' regions are 2 GB,
  the pairs of a workload far more)."""
  return batches.LazyRows(np.arange(n) % len(x), lambda r: x[r], x.shape[1:], x.dtype)


def _inputs(vocab: int, width: int, n: int, seed: int):
  """n random texts [n, TEXT_LEN] (+ all-ones mask) and images [n, REGIONS, width] (+ mask)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (n, TEXT_LEN)).astype(np.int32)
  regions = rng.standard_normal((n, REGIONS, width), np.float32)
  return (tokens, np.ones(tokens.shape, np.int32), regions,
          np.ones((n, REGIONS), np.int32))


def _workload(run, n: int, batch: int, per_batch: float, budget: float) -> Cell:
  """Cost of run(n), n items in batches of `batch` (one takes `per_batch` s, padded if short):
  run in full if the estimate is within `budget` seconds, else the estimate (extrapolated)."""
  if n <= batch:
    return Cell(per_batch, True)
  estimate = per_batch * math.ceil(n / batch)
  if estimate > budget:
    return Cell(estimate, False)
  return Cell(_once(lambda: run(n)), True)


def _add(*cells: Cell) -> Cell:
  return Cell(sum(c.seconds for c in cells), all(c.measured for c in cells))


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
  x = np.random.default_rng(seed).standard_normal((n, dim), np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


class _Work:
  """The model's batched work on tiled random inputs: n texts, images or (text, image) pairs."""

  def __init__(self, model, mode, params, vocab: int, batch: int, k: int, seed: int):
    cfg = model.cfg
    self.batch, self.k = batch, k
    self.tok, self.tmask, self.reg, self.rmask = _inputs(
        vocab, cfg.feature_dim + cfg.box_dim, max(batch, k), seed)
    self.one = engine_lib.Engine(model, mode, 1, params)
    self.batched = engine_lib.Engine(model, mode, batch, params)
    self.reranker = rerank_lib.Reranker(model, k, query_block=1)

  def texts(self, n: int):
    return self.batched.embed_texts(_tiled(self.tok, n), _tiled(self.tmask, n))

  def images(self, n: int):
    return self.batched.embed_images(_tiled(self.reg, n), _tiled(self.rmask, n))

  def pairs(self, n: int):
    return self.batched.score_pairs(_tiled(self.tok, n), _tiled(self.tmask, n),
                                    _tiled(self.reg, n), _tiled(self.rmask, n))

  def query(self):
    return self.one.embed_texts(self.tok[:1], self.tmask[:1])

  def rerank(self, ids: np.ndarray, scores: np.ndarray):
    """The jitted rerank of one query's k candidates (its text with k images)."""
    k = self.k

    def pair_inputs(rows, cand):  # [1, k, ...] each
      del rows, cand
      return (np.repeat(self.tok[None, :1], k, 1), np.repeat(self.tmask[None, :1], k, 1),
              self.reg[None, :k], self.rmask[None, :k])
    return self.reranker(self.one.ce_params, pair_inputs, ids, scores)["ids"]


def measure(model, mode, params, vocab: int, k: int, batch: int, budget: float, seed: int = 0,
            log=print) -> dict:
  """Tables 3 and 4 on this device: {"latency_50k": {method: Cell}, "eval_coco5k": {...},
  "parts": {name: Cell}} (the module docstring says what each includes)."""
  work = _Work(model, mode, params, vocab, batch, k, seed)
  dim = model.cfg.hidden_size
  # One steady batch of each kind of work; the totals scale (or run in full) from it.
  text_s, image_s, pair_s = (timed(lambda run=run: run(batch), 2)
                             for run in (work.texts, work.images, work.pairs))

  # Table 3: one query against 50k images.
  query = Cell(timed(work.query, 3), True)
  corpus = index_lib.ExactIndex(_unit(LATENCY_IMAGES, dim, seed))
  q_emb = _unit(1, dim, seed + 1)
  search = Cell(timed(lambda: corpus.search(q_emb, k), 5), True)
  ids, scores = corpus.search(q_emb, k)
  rerank = Cell(timed(lambda: work.rerank(ids, scores), 3), True)
  be = _add(query, search)
  latency = {"BE": be, "RR": _add(be, rerank),
             "CE": _workload(work.pairs, LATENCY_IMAGES, batch, pair_s, budget)}
  log(f"Table 3 (one query, {LATENCY_IMAGES} images): BE {be.seconds * 1e3:.1f} ms, "
      f"RR {latency['RR'].seconds * 1e3:.1f} ms, CE {latency['CE'].seconds:.1f} s", flush=True)

  # Table 4: MSCOCO 5k test, nothing cached.
  enc_texts = _workload(work.texts, COCO5K_TEXTS, batch, text_s, budget)
  enc_images = _workload(work.images, COCO5K_IMAGES, batch, image_s, budget)
  txt_emb, img_emb = _unit(COCO5K_TEXTS, dim, seed + 2), _unit(COCO5K_IMAGES, dim, seed + 3)
  depth = max(10, k)
  search_both = Cell(_once(lambda: (index_lib.ExactIndex(img_emb).search(txt_emb, depth),
                                    index_lib.ExactIndex(txt_emb).search(img_emb, depth))), True)
  be = _add(enc_texts, enc_images, search_both)
  rr_pairs = _workload(work.pairs, (COCO5K_TEXTS + COCO5K_IMAGES) * k, batch, pair_s, budget)
  ce = _workload(work.pairs, COCO5K_TEXTS * COCO5K_IMAGES, batch, pair_s, budget)
  evaluation = {"BE": be, "RR": _add(be, rr_pairs), "CE": ce}
  log(f"Table 4 (MSCOCO 5k test): BE {be.seconds:.0f} s, RR {evaluation['RR'].seconds:.0f} s, "
      f"CE {ce.seconds / 3600:.1f} h", flush=True)
  parts = {"encode one query": query, "search 50k": search, f"rerank {k} pairs": rerank,
           "encode 25k captions": enc_texts, "encode 5k images": enc_images,
           "search both directions": search_both,
           f"{(COCO5K_TEXTS + COCO5K_IMAGES) * k} RR pairs": rr_pairs}
  return {"latency_50k": latency, "eval_coco5k": evaluation, "parts": parts}


def to_json(res: dict, **about) -> dict:
  """The bench.json "paper" entry: rows of (table, method, seconds, measured, paper seconds)."""
  rows = []
  for key, table, published in (("latency_50k", "3", paper_numbers.LATENCY_50K),
                                ("eval_coco5k", "4", paper_numbers.EVAL_COCO5K)):
    for method, cell in res[key].items():
      rows.append({"table": table, "method": method, "seconds": cell.seconds,
                   "measured": cell.measured, "paper_seconds": published[method].value,
                   "paper_source": paper_numbers.SOURCES[published[method].source]})
  parts = {name: dataclasses.asdict(cell) for name, cell in res["parts"].items()}
  return dict(about, text_len=TEXT_LEN, regions=REGIONS, rows=rows, parts=parts)


def _duration(s: float) -> str:
  if s < 1:
    return f"{s * 1e3:.1f} ms"
  if s < 120:
    return f"{s:.1f} s"
  return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _ratio(x: float) -> str:
  return f"{x:.2g}x" if x < 10 else f"{x:,.0f}x"


def markdown(paper: dict) -> str:
  """The two tables, ours beside the paper's; * = partly extrapolated."""
  lines = [f"The paper's Tables 3 and 4 on this device: model {paper['model']}, "
           f"{paper['text_len']} text tokens, {paper['regions']} regions, k={paper['k']}, "
           f"batches of {paper['batch']}. * = partly extrapolated from a timed batch.", "",
           "| table | quantity | method | ours | paper | ours / paper |",
           "|---|---|---|---|---|---|"]
  what = {"3": f"latency per query, {LATENCY_IMAGES} images",
          "4": f"evaluate MSCOCO 5k test ({COCO5K_TEXTS} x {COCO5K_IMAGES})"}
  for r in paper["rows"]:
    star = "" if r["measured"] else "*"
    lines.append(f"| {r['table']} | {what[r['table']]} | {r['method']} "
                 f"| {_duration(r['seconds'])}{star} | {_duration(r['paper_seconds'])} "
                 f"| {_ratio(r['seconds'] / r['paper_seconds'])} |")
  sources = sorted({r["paper_source"] for r in paper["rows"]})
  lines += ["", "Paper figures: " + "; ".join(sources) + "."]
  return "\n".join(lines) + "\n"
