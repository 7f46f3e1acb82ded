r"""The efficiency claim, measured: per-query latency of BE, RR and CE-full by corpus size,
and the paper's own cost tables (its Tables 3 and 4) on this device.

  python -m rerank.bench --out=DIR [--sizes=1000,10000,100000,1000000] [--model=tiny|base] [--quick]
      [--nopaper] [--paper_budget=60] [--pixels=blip,vilt [--pixel_model=small|base] [--noregions]]

For each corpus size N (one run, one machine, all figures side by side):
- BE: encode one text query + search the index (exact up to 20k items, ScaNN beyond).
- RR: BE + the jitted rerank of its k (query, image) pairs by the CE. `CE-k` is those k pairs
  alone, so RR / CE-k shows how little the first stage adds.
- CE: the CE over all N pairs of a query. Measured up to --ce_max pairs; beyond, extrapolated
  linearly from the largest measured size and marked `"measured": false`.
- Index: ScaNN recall@k against exact brute force, and both search times, for the default
  number of leaves searched and for a half and a quarter of it (same index).
Search times are per query over a batch of --queries queries (both backends batched alike).

Corpus embeddings are SYNTHETIC and clustered like a trained model's (not i.i.d. Gaussians):
unit vectors around N / 100 centres (at most 20k), each item a centre plus noise; queries are
noisy copies of random corpus items (a caption near its image). The model has random weights
(its cost does not depend on them); CE pairs read real synthetic_scenes inputs.

The paper's tables, from the same run and model (rerank/evaluation/paper_costs.py says what each
cell includes): Table 3, the latency of one query against 50k images, and Table 4, the time to
evaluate MSCOCO 5k test (25,000 captions x 5,000 images), for BE, RR and CE, at the paper's input
lengths (72 text tokens, 50 regions), beside the paper's figures (Table 4: one V100). They are
the paper's model size with `--model=base`; smaller models run quickly on a CPU. Work that would
take longer than --paper_budget seconds is scaled from a timed batch and starred.

With --pixels, also the pixel families' reranking cost per query (rerank/evaluation/
pixel_costs.py): CE-k from pixels, from the image files, and for BLIP from the image states a
folder index caches, side by side (ViLT has nothing to cache); --noregions runs only that.

Writes DIR/bench.json (`rows`: N, method, seconds_per_query, measured; `index_rows`: N,
recall_at_k, scann_seconds, exact_seconds; `paper`: rows of table, method, seconds, measured,
paper_seconds; `pixels`: one row per family), DIR/bench.md and DIR/bench.png (log-log; not
with --noregions).
"""

import dataclasses
import json
import os
import platform
import time

from absl import flags
import jax
import numpy as np

from configs import demo
from rerank import cli
from rerank.data import datasets
from rerank.evaluation import paper_costs
from rerank.evaluation import pixel_costs
from rerank.indexing import indexes as index_lib
from rerank.inference import engine
from rerank.inference import reranker as rerank_lib
from rerank.models import build

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("out", None, "Output directory for bench.json, bench.md, bench.png.")
  flags.DEFINE_list("sizes", None, "Corpus sizes (default 1e3,1e4,1e5,1e6; --quick 1e3,1e4,1e5).")
  flags.DEFINE_enum("model", "tiny", ["tiny", "mini", "small", "base"], "Encoder size.")
  flags.DEFINE_bool("quick", False, "A few minutes on a laptop CPU; still one corpus of 100k.")
  flags.DEFINE_integer("k", 20, "Candidates reranked, and the k of recall@k.")
  flags.DEFINE_integer("queries", 0, "Queries per search timing (default 200; quick 50).")
  flags.DEFINE_integer("ce_max", 0, "Largest CE-full size measured (default 4096; quick 1024).")
  flags.DEFINE_integer("seed", 0, "Seed of the synthetic embeddings.")
  flags.DEFINE_bool("paper", True, "Also measure the paper's Tables 3 and 4 (--nopaper: skip).")
  flags.DEFINE_list("pixels", [], f"Pixel families ({', '.join(pixel_costs.FAMILIES)}) whose CE-k "
                    "per query to measure: from pixels, from files, from BLIP's cached states.")
  flags.DEFINE_enum("pixel_model", "small", list(pixel_costs.SIZES), "Size of the --pixels models.")
  flags.DEFINE_bool("regions", True, "Measure the region-feature model (--noregions: only --pixels).")
  flags.DEFINE_float("paper_budget", 60.0, "Paper tables: work expected to take longer than this "
                     "many seconds is extrapolated from a timed batch instead of run in full.")


def clustered_embeddings(n: int, dim: int, seed: int, spread: float = 1.0) -> np.ndarray:
  """[n, dim] unit vectors: a centre (of n / 100, at most 20k) plus Gaussian noise each."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((max(1, min(n // 100, 20_000)), dim), np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  out = np.empty((n, dim), np.float32)
  for a in range(0, n, 100_000):  # chunks keep the temporary noise small at 1M x 768
    b = min(a + 100_000, n)
    x = centres[rng.integers(0, len(centres), b - a)]
    x += rng.standard_normal((b - a, dim), np.float32) * (spread / np.sqrt(dim))
    out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def _queries_near(corpus: np.ndarray, q: int, seed: int, noise: float = 1.0) -> np.ndarray:
  rng = np.random.default_rng(seed + 1)
  x = corpus[rng.integers(0, len(corpus), q)]
  x = x + rng.standard_normal(x.shape, np.float32) * (noise / np.sqrt(x.shape[1]))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


_timed = paper_costs.timed  # median after one untimed (compiling) call


class _Model:
  """A random-weight joint model with the jitted pieces the bench times."""

  def __init__(self, size: str, k: int, pair_batch: int = 256):
    self.config = c = demo.get_config(f"size={size}")
    if size == "base":  # the paper's input lengths: 70 wordpieces + 2, 50 regions
      c.max_text_len, c.max_regions = 72, 50
    tok = datasets.get_tokenizer(c)
    self.vocab = tok.get_vocab_size()
    self.model = build.build_model(c, tok.token_to_id("[CLS]"), self.vocab)
    self.params = build.init_params(self.model, c, jax.random.PRNGKey(0))
    self.data, _ = datasets.load_split(c, "test", tok, 64)
    self.encoder = engine.DataScorer(engine.Engine(self.model, c.mode, 1, self.params))
    # Pairs go in fixed batches (padded): a batch larger than the pairs measured would bill
    # the padding to CE-full.
    self.pair_scorer = engine.DataScorer(engine.Engine(self.model, c.mode, pair_batch, self.params))
    self.reranker = rerank_lib.Reranker(self.model, k, query_block=1)
    self.k = k

  def encode_one(self):
    return self.encoder.texts(self.data, np.arange(1))

  def ce_pairs(self, n: int):
    """Scores n (text, image) pairs, as CE-full does for one query over n items."""
    rows = np.arange(n) % self.data.num_images
    return self.pair_scorer.pairs(self.data, np.zeros(n, np.int64), rows)

  def rerank_one(self, be_ids: np.ndarray, be_scores: np.ndarray):
    k, d = self.k, self.data

    def pairs(rows, cand):
      regions, mask = d.region_features(cand.reshape(-1) % d.num_images)
      return (np.repeat(d.token_ids[rows][:, None], k, 1), np.repeat(d.text_mask[rows][:, None], k, 1),
              regions.reshape((1, k) + regions.shape[1:]), mask.reshape(1, k, -1))
    return self.reranker(self.params, pairs, be_ids, be_scores)["ids"]


def run(out_dir: str, sizes, model_size: str, k: int, queries: int, ce_max: int, seed: int,
        log=print, paper_budget: float | None = 60.0, pixels=(), pixel_model: str = "small",
        regions: bool = True) -> dict:
  """Measures everything and returns the bench.json content (also written to out_dir).

  `paper_budget`: seconds of work the paper tables may run in full (None: no paper tables).
  `pixels`: pixel families whose CE-k to measure at size `pixel_model`; `regions=False`
  measures only those.
  """
  machine = (f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on "
             f"{jax.devices()[0].platform}")
  pixel_rows = pixel_costs.measure(pixels, pixel_model, k, seed, log=log) if pixels else []
  if not regions:
    result = {"k": k, "machine": machine, "pixels": pixel_rows}
    write(out_dir, result)
    return result
  pair_batch = min(256, ce_max)
  m = _Model(model_size, k, pair_batch=pair_batch)
  dim = m.config.model.hidden_size
  enc = _timed(m.encode_one, 5)
  log(f"model {model_size} ({dim}-d): encode one query {enc * 1e3:.2f} ms")
  # CE-full: measured sizes (powers of 2 up to ce_max) give seconds per pair.
  ce_measured = {}
  for n in sorted({min(n, ce_max) for n in sizes} | {min(256, ce_max)}):
    ce_measured[n] = _timed(lambda n=n: m.ce_pairs(n), 2 if n > 1000 else 3)
    log(f"CE over {n} pairs: {ce_measured[n]:.3f} s")
  largest = max(ce_measured)
  per_pair = ce_measured[largest] / largest
  rows, index_rows = [], []
  for n in sizes:
    t0 = time.perf_counter()
    corpus = clustered_embeddings(n, dim, seed)
    qs = _queries_near(corpus, queries, seed)
    one_q = qs[:1]
    exact = index_lib.ExactIndex(corpus)
    exact_s = _timed(lambda: exact.search(qs, k), 1 if n >= 500_000 else 3) / queries
    want = exact.search(qs, k)[0]
    entry = {"N": n, "k": k, "exact_seconds": exact_s}
    backend = "exact" if n <= 20_000 else "scann"
    search_s = exact_s
    if n >= 1000:  # ScaNN needs enough points to train its partitions and codebooks
      tb = time.perf_counter()
      scann = index_lib.build(corpus, "scann")
      build_s = time.perf_counter() - tb
      default = scann.params.leaves_to_search
      # The default, then cheaper searches of the same index: the recall / speed trade-off.
      for leaves in sorted({default, max(1, default // 2), max(1, default // 4)}, reverse=True):
        scann_s = _timed(lambda leaves=leaves: scann.search(qs, k, leaves), 3) / queries
        got = scann.search(qs, k, leaves)[0]
        recall = float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got, want)]))
        index_rows.append(dict(entry, recall_at_k=recall, scann_seconds=scann_s,
                               speedup=exact_s / scann_s, scann_build_seconds=build_s,
                               leaves_to_search=leaves, default=leaves == default,
                               scann=dataclasses.asdict(scann.params)))
        log(f"N={n}: ScaNN ({leaves}/{scann.params.num_leaves} leaves) recall@{k} {recall:.3f}, "
            f"search {scann_s * 1e3:.3f} ms/query vs exact {exact_s * 1e3:.3f} ms/query "
            f"({exact_s / scann_s:.1f}x), built in {build_s:.1f}s")
        if backend == "scann" and leaves == default:
          search_s = scann_s
    idx = scann if backend == "scann" else exact
    ids, scores = idx.search(one_q, k)
    ce_k = _timed(lambda: m.rerank_one(ids, scores), 5)
    be = enc + search_s
    rr = be + ce_k
    ce_full, measured = (ce_measured[n], True) if n in ce_measured else (n * per_pair, False)
    for method, sec, meas in (("BE", be, True), ("RR", rr, True), ("CE-k", ce_k, True),
                              ("CE", ce_full, measured)):
      rows.append({"N": n, "method": method, "seconds_per_query": sec, "measured": meas,
                   "index": backend if method in ("BE", "RR") else None})
    log(f"N={n}: BE {be * 1e3:.2f} ms, RR {rr * 1e3:.2f} ms (CE-k {ce_k * 1e3:.2f} ms), "
        f"CE {ce_full:.3f} s{'' if measured else ' (extrapolated)'} "
        f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    corpus = exact = idx = scann = None  # free the large arrays before the next size
  paper = None
  if paper_budget is not None:
    paper = paper_costs.to_json(
        paper_costs.measure(m.model, m.config.mode, m.params, m.vocab, k, pair_batch,
                            paper_budget, seed, log=log),
        model=model_size, k=k, batch=pair_batch, budget_seconds=paper_budget)
  result = {
      "model": model_size, "dim": dim, "k": k, "queries": queries, "ce_measured_max": ce_max,
      "ce_seconds_per_pair": per_pair, "encode_seconds": enc,
      "machine": machine,
      "embeddings": "synthetic clustered unit vectors (N/100 centres, at most 20k; noise 0.5); "
                    "queries are noisy copies of corpus items",
      "rows": rows, "index_rows": index_rows}
  if paper is not None:
    result["paper"] = paper
  if pixel_rows:
    result["pixels"] = pixel_rows
  write(out_dir, result)
  return result


def markdown(res: dict) -> str:
  if "rows" not in res:  # --noregions
    return f"{res['machine']}.\n\n" + pixel_costs.markdown(res.get("pixels", []))
  k = res["k"]
  by = {(r["N"], r["method"]): r for r in res["rows"]}
  sizes = sorted({r["N"] for r in res["rows"]})
  lines = [f"Model {res['model']} ({res['dim']}-d), k={k}, {res['machine']}. "
           f"Seconds per query; * = CE extrapolated linearly from {res['ce_measured_max']} pairs.",
           "", "| N | BE | RR | CE-k | CE | RR / CE-k | CE / RR | N / k |",
           "|---|---|---|---|---|---|---|---|"]
  for n in sizes:
    be, rr, cek, ce = (by[(n, x)] for x in ("BE", "RR", "CE-k", "CE"))
    star = "" if ce["measured"] else "*"
    lines.append(f"| {n} | {be['seconds_per_query']:.2e} | {rr['seconds_per_query']:.2e} "
                 f"| {cek['seconds_per_query']:.2e} | {ce['seconds_per_query']:.2e}{star} "
                 f"| {rr['seconds_per_query'] / cek['seconds_per_query']:.2f} "
                 f"| {ce['seconds_per_query'] / rr['seconds_per_query']:.1f} | {n / k:.0f} |")
  lines += ["", f"| N | leaves searched | ScaNN recall@{k} | ScaNN s/query | exact s/query "
            "| speedup | build s |", "|---|---|---|---|---|---|---|"]
  for r in res["index_rows"]:
    leaves = f"{r['leaves_to_search']}/{r['scann']['num_leaves']}{' (default)' * r['default']}"
    lines.append(f"| {r['N']} | {leaves} | {r['recall_at_k']:.3f} | {r['scann_seconds']:.2e} "
                 f"| {r['exact_seconds']:.2e} | {r['speedup']:.1f}x | {r['scann_build_seconds']:.1f} |")
  if "paper" in res:
    lines += ["", paper_costs.markdown(res["paper"]).rstrip("\n")]
  if res.get("pixels"):
    lines += ["", pixel_costs.markdown(res["pixels"]).rstrip("\n")]
  return "\n".join(lines) + "\n"


def _plot(res: dict, path: str):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for method, style in (("BE", "o-"), ("RR", "s-"), ("CE", "^-")):
    pts = sorted((r["N"], r["seconds_per_query"], r["measured"]) for r in res["rows"]
                 if r["method"] == method)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
    ext = [p for p in pts if not p[2]]
    if ext:
      ax.plot([p[0] for p in ext], [p[1] for p in ext], "^", mfc="none", ms=12, color="gray",
              label="CE extrapolated")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("corpus size N")
  ax.set_ylabel("seconds per query")
  ax.set_title(f"model {res['model']}, k={res['k']}")
  ax.legend()
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(out_dir: str, res: dict):
  """bench.json, bench.md and bench.png, each written to a temp name and renamed."""
  os.makedirs(out_dir, exist_ok=True)
  files = {"bench.json": json.dumps(res, indent=2) + "\n", "bench.md": markdown(res)}
  for name, text in files.items():
    tmp = os.path.join(out_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out_dir, name))
  if "rows" not in res:  # --noregions: nothing to plot
    return
  tmp = os.path.join(out_dir, ".bench.tmp.png")
  _plot(res, tmp)
  os.replace(tmp, os.path.join(out_dir, "bench.png"))


def main(argv):
  del argv
  cli.quiet_library_logs()
  if not FLAGS.out:
    cli.fail("--out is required, e.g. --out=workdirs/bench")
  quick = FLAGS.quick
  try:
    sizes = [int(float(s)) for s in (FLAGS.sizes or (["1e3", "1e4", "1e5"] if quick else
                                                      ["1e3", "1e4", "1e5", "1e6"]))]
  except ValueError:
    cli.fail(f"--sizes: expected comma-separated integers; found {FLAGS.sizes}")
  if not sizes or min(sizes) < FLAGS.k:
    cli.fail(f"--sizes: every size must be >= k={FLAGS.k}; found {sizes}")
  queries = FLAGS.queries or (50 if quick else 200)
  ce_max = FLAGS.ce_max or (1024 if quick else 4096)
  t0 = time.perf_counter()
  if FLAGS.paper_budget < 0:
    cli.fail(f"--paper_budget: expected seconds >= 0; found {FLAGS.paper_budget}")
  unknown = sorted(set(FLAGS.pixels) - set(pixel_costs.FAMILIES))
  if unknown:
    cli.fail(f"--pixels: expected families among {', '.join(pixel_costs.FAMILIES)}; found {unknown[0]!r}")
  if not FLAGS.regions and not FLAGS.pixels:
    cli.fail("--noregions: expected --pixels=FAMILIES to measure instead; found none")
  res = run(FLAGS.out, sorted(sizes), FLAGS.model, FLAGS.k, queries, ce_max, FLAGS.seed,
            paper_budget=FLAGS.paper_budget if FLAGS.paper else None, pixels=FLAGS.pixels,
            pixel_model=FLAGS.pixel_model, regions=FLAGS.regions)
  print("\n" + markdown(res))
  print(f"wrote {FLAGS.out}/bench.json, bench.md{', bench.png' if FLAGS.regions else ''} in "
        f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
  cli.run(main, define_flags)
