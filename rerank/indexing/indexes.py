"""Nearest-neighbour indexes over unit embeddings: the first stage of retrieve-and-rerank.

Backends, all scoring by dot product (= cosine on unit vectors), all with one verb,
`search(queries [Q, D], k) -> (ids [Q, k] int64, scores [Q, k] float32)`, best first:
- `exact`: NumPy brute force; ties go to the lower id, exactly like `ranking.ranking_from_scores`
  (evaluation with it reproduces the plain `scores = q @ corpus.T` path bit for bit).
- `scann`: ScaNN tree (k-means partitions) + anisotropic hashing + exact float reorder; its
  parameters come from the config or are chosen from the corpus size (`scann_params`). With
  `target_recall`, the leaves to search are calibrated at build time (rerank/indexing/
  calibrate.py) and the measurement is kept in the index metadata.
- `jax`: exact top-k on the accelerator (`lax.top_k`), queries padded to a fixed block.
- `ShardedIndex`: one index per shard (one per host), per-shard top-k merged into the global one.
  A corpus too large for one host is built and saved as one shard per process
  (`save_multihost`), each process searching its own shard (`load_shard`, `search_multihost`).
`backend="auto"` picks exact up to `exact_max` items and ScaNN beyond.

An index is saved in its own directory (`index.json` + arrays), written to a temporary
directory and renamed, with the identity of the checkpoint that made the embeddings;
`load(..., expect=...)` refuses an index from another checkpoint or embedding size.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile

import jax
import numpy as np

from rerank.indexing import calibrate
from rerank.indexing import ranking

BACKENDS = ("auto", "exact", "scann", "jax")
_META = "index.json"
_SCORE_BLOCK = 1 << 26  # floats; bounds the [queries, N] score block of brute force (256 MB)


class IndexMismatchError(ValueError):
  """The saved index was built from another checkpoint or embedding size."""


def _check_queries(queries, dim: int) -> np.ndarray:
  q = np.asarray(queries, np.float32)
  if q.ndim != 2 or q.shape[1] != dim:
    raise ValueError(f"queries: expected [Q, {dim}] embeddings; found shape {q.shape}")
  return q


def _clamp_k(k: int, size: int) -> int:
  """k larger than the corpus is clamped to the corpus size (documented); k < 1 is an error."""
  if k < 1:
    raise ValueError(f"k: expected >= 1; found {k}")
  return min(k, size)


def _as_unit_matrix(embeddings) -> np.ndarray:
  x = np.ascontiguousarray(np.asarray(embeddings, np.float32))
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"embeddings: expected a non-empty [N, D] matrix; found shape {x.shape}")
  return x


# ------------------------------------------------------------------ exact (NumPy)

class ExactIndex:
  kind = "exact"

  def __init__(self, embeddings):
    self.embeddings = _as_unit_matrix(embeddings)  # [N, D]

  size = property(lambda self: self.embeddings.shape[0])
  dim = property(lambda self: self.embeddings.shape[1])

  def search(self, queries, k: int):
    q = _check_queries(queries, self.dim)
    k = _clamp_k(k, self.size)
    block = max(1, _SCORE_BLOCK // self.size)
    ids, scores = [], []
    for a in range(0, len(q), block):
      s = q[a:a + block] @ self.embeddings.T  # [block, N]
      top = ranking.ranking_from_scores(s, k)
      ids.append(top)
      scores.append(np.take_along_axis(s, top, axis=1))
    if not ids:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(ids), np.concatenate(scores)

  def _save(self, path):
    np.save(os.path.join(path, "embeddings.npy"), self.embeddings)
    return {}

  @classmethod
  def _load(cls, path, meta):
    return cls(np.load(os.path.join(path, "embeddings.npy"), mmap_mode="r"))


# ------------------------------------------------------------------ exact on device (JAX)

@functools.partial(jax.jit, static_argnames=("k",))
def _jax_topk(corpus, queries, k: int):
  """[N, D] x [B, D] -> top-k (scores [B, k], ids [B, k]) by dot product, on device."""
  return jax.lax.top_k(queries @ corpus.T, k)


class JaxIndex:
  """Exact top-k on the default device; queries go in fixed blocks so one k compiles once."""

  kind = "jax"

  def __init__(self, embeddings, query_block: int = 256):
    self.host = _as_unit_matrix(embeddings)
    self.corpus = jax.device_put(self.host)  # [N, D]
    self.query_block = query_block

  size = property(lambda self: self.host.shape[0])
  dim = property(lambda self: self.host.shape[1])

  def search(self, queries, k: int):
    q = _check_queries(queries, self.dim)
    k = _clamp_k(k, self.size)
    ids, scores = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
    b = self.query_block
    for a in range(0, len(q), b):
      chunk = q[a:a + b]
      padded = np.zeros((b, self.dim), np.float32)
      padded[:len(chunk)] = chunk
      s, i = _jax_topk(self.corpus, padded, k)
      ids.append(np.asarray(i, np.int64)[:len(chunk)])
      scores.append(np.asarray(s)[:len(chunk)])
    return np.concatenate(ids), np.concatenate(scores)

  def _save(self, path):
    np.save(os.path.join(path, "embeddings.npy"), self.host)
    return {"query_block": self.query_block}

  @classmethod
  def _load(cls, path, meta):
    return cls(np.load(os.path.join(path, "embeddings.npy")), meta.get("query_block", 256))


# ------------------------------------------------------------------ ScaNN

@dataclasses.dataclass(frozen=True)
class ScannParams:
  """Tree + asymmetric hashing + reorder; see `scann_params` for the defaults by corpus size."""

  num_leaves: int
  leaves_to_search: int
  reorder: int  # candidates re-scored exactly in float32 before the final top-k
  dims_per_block: int = 2
  aq_threshold: float = 0.2  # anisotropic quantization, as ScaNN's docs recommend for MIPS
  training_sample: int = 250_000
  # > 0: leaves_to_search is calibrated at build time to reach this recall@recall_k against
  # exact search on up to `calibration_queries` held-out queries; `calibration` holds the result.
  target_recall: float = 0.0
  recall_k: int = 20
  calibration_queries: int = 1000
  calibration: dict | None = None


def scann_params(n: int, cfg=None) -> ScannParams:
  """Fields of `cfg` (config.index) that are > 0 win; the others are chosen from n.

  About 2 * sqrt(n) leaves (1M -> 2000), searching a third of them, reordering 500: on the
  bench's clustered unit embeddings (overlapping clusters, so the true neighbours of a query
  spread over many partitions) that keeps recall@20 >= 0.95 against exact at 1M while still
  searching tens of times faster (see rerank/bench.py). Corpora with tighter clusters can
  search far fewer leaves: set config.index.leaves_to_search, or config.index.target_recall to
  have the count measured at build time (a fixed leaves_to_search turns calibration off).
  """
  get = (lambda name, default: cfg.get(name) or default) if cfg is not None else (lambda _, d: d)
  leaves = int(get("num_leaves", max(1, min(n // 50, int(2 * math.sqrt(n))))))
  leaves = max(1, min(leaves, n))
  search = int(get("leaves_to_search", math.ceil(leaves / 3)))
  return ScannParams(
      num_leaves=leaves, leaves_to_search=min(search, leaves), reorder=int(get("reorder", 500)),
      dims_per_block=int(get("dims_per_block", 2)), aq_threshold=float(get("aq_threshold", 0.2)),
      training_sample=int(get("training_sample", 250_000)),
      target_recall=0.0 if get("leaves_to_search", 0) else float(get("target_recall", 0.0)),
      recall_k=int(get("recall_k", 20)),
      calibration_queries=int(get("calibration_queries", 1000)))


class ScannIndex:
  kind = "scann"

  def __init__(self, searcher, size: int, dim: int, params: ScannParams):
    self.searcher, self.params = searcher, params
    self.size, self.dim = size, dim

  @classmethod
  def build(cls, embeddings, params: ScannParams | None = None, queries=None) -> "ScannIndex":
    """The ScaNN index of [N, D] embeddings; with `params.target_recall`, calibrated on
    `queries` ([Q, D] held-out queries; None = a leave-one-out sample of the corpus)."""
    import scann  # noqa: PLC0415  (a heavy import only this backend needs)
    x = _as_unit_matrix(embeddings)
    p = params or scann_params(len(x))
    builder = scann.scann_ops_pybind.builder(x, min(10, len(x)), "dot_product")
    builder = builder.tree(num_leaves=p.num_leaves, num_leaves_to_search=p.leaves_to_search,
                           training_sample_size=min(p.training_sample, len(x)))
    builder = builder.score_ah(p.dims_per_block, anisotropic_quantization_threshold=p.aq_threshold)
    searcher = builder.reorder(p.reorder).build()
    index = cls(searcher, len(x), x.shape[1], p)
    if p.target_recall > 0:
      index.params = calibrate_leaves(index, x, queries)
    return index

  def search(self, queries, k: int, leaves_to_search: int | None = None):
    """As the other backends; `leaves_to_search` overrides the built value for this call."""
    q = _check_queries(queries, self.dim)
    k = _clamp_k(k, self.size)
    if not len(q):
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    ids, scores = self.searcher.search_batched(
        q, final_num_neighbors=k, pre_reorder_num_neighbors=max(k, self.params.reorder),
        leaves_to_search=leaves_to_search or self.params.leaves_to_search)
    ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
    if ids.shape[1] < k:  # ScaNN may find fewer than k in the searched leaves: pad as misses
      pad = k - ids.shape[1]
      ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
      scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, scores

  def _save(self, path):
    os.makedirs(os.path.join(path, "scann"))
    # Relative asset paths, so the directory still loads after the rename that publishes it.
    self.searcher.serialize(os.path.join(path, "scann"), relative_path=True)
    return {"scann": dataclasses.asdict(self.params)}

  @classmethod
  def _load(cls, path, meta):
    import scann  # noqa: PLC0415
    searcher = scann.scann_ops_pybind.load_searcher(os.path.join(path, "scann"))
    return cls(searcher, meta["size"], meta["dim"], ScannParams(**meta["scann"]))


# ------------------------------------------------------------------ sharded

def merge_topk(ids: np.ndarray, scores: np.ndarray, k: int):
  """[Q, M] candidates from several shards (global ids) -> the best k, ties to the lower id."""
  order = np.lexsort((ids, -scores), axis=1)[:, :k] if ids.size else np.zeros((len(ids), 0), int)
  return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


class ShardedIndex:
  """Shards of one corpus (rows [offset, offset + size) each), searched and merged.

  On several hosts, each host builds the index of its own rows and `search_multihost` merges
  the per-host top-k; in one process this class holds all shards.
  """

  kind = "sharded"

  def __init__(self, shards, offsets):
    self.shards, self.offsets = list(shards), [int(o) for o in offsets]
    dims = {s.dim for s in self.shards}
    if len(dims) != 1:
      raise ValueError(f"shards: expected one embedding size; found {sorted(dims)}")

  size = property(lambda self: sum(s.size for s in self.shards))
  dim = property(lambda self: self.shards[0].dim)

  def search(self, queries, k: int):
    k = _clamp_k(k, self.size)
    parts = [s.search(queries, min(k, s.size)) for s in self.shards]
    ids = np.concatenate([np.where(i >= 0, i + o, -1) for (i, _), o in zip(parts, self.offsets)], 1)
    return merge_topk(ids, np.concatenate([s for _, s in parts], 1), k)

  def _save(self, path):
    for j, shard in enumerate(self.shards):
      _write(shard, os.path.join(path, f"shard-{j:05d}"))
    return {"offsets": self.offsets}

  @classmethod
  def _load(cls, path, meta):
    return cls([_read(os.path.join(path, f"shard-{j:05d}")) for j in range(len(meta["offsets"]))],
               meta["offsets"])


def search_multihost(local_index, offset: int, queries, k: int):
  """Global top-k when every process holds the index of rows [offset, offset + local size).

  Every process must pass the same queries and k; each returns the same merged result.
  """
  from jax.experimental import multihost_utils  # noqa: PLC0415
  ids, scores = local_index.search(queries, min(k, local_index.size))
  ids = np.where(ids >= 0, ids + offset, -1)
  if ids.shape[1] < k:  # a host with fewer than k rows: pad so every host sends [Q, k]
    ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
    scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])), constant_values=-np.inf)
  if jax.process_count() > 1:
    ids = np.asarray(multihost_utils.process_allgather(ids))  # [P, Q, k]
    scores = np.asarray(multihost_utils.process_allgather(scores))
    ids, scores = np.concatenate(list(ids), 1), np.concatenate(list(scores), 1)
  ids, scores = merge_topk(ids, scores, k)
  found = (ids >= 0).any(axis=0)  # k beyond the global corpus: drop the all-padding columns
  return ids[:, found], scores[:, found]


def shard_rows(n: int, num_shards: int, shard: int) -> tuple[int, int]:
  """[start, stop) of shard `shard` when n rows are split as evenly as possible."""
  per, extra = divmod(n, num_shards)
  start = shard * per + min(shard, extra)
  return start, start + per + (shard < extra)


# ------------------------------------------------------------------ ScaNN calibration

def calibrate_leaves(index: ScannIndex, corpus: np.ndarray, queries=None) -> ScannParams:
  """index.params with leaves_to_search the fewest reaching params.target_recall (measured
  recall@recall_k of the ScaNN top-k vs the exact top-k) and `calibration` recording it.

  Queries: up to params.calibration_queries rows of `queries`, else as many corpus rows, each
  leaving itself out of both answers (rerank/indexing/calibrate.py).
  """
  p = index.params
  if queries is None:
    own = calibrate.sample_rows(len(corpus), p.calibration_queries)
    q, source = corpus[own], "corpus rows, leave-one-out"
    k = min(p.recall_k, len(corpus) - 1)
  else:
    q = _check_queries(queries, corpus.shape[1])[:p.calibration_queries]
    own, source, k = None, "held-out queries", min(p.recall_k, len(corpus))
  if k < 1 or not len(q):
    raise ValueError(f"index.target_recall: calibration needs queries and a corpus of >= 2 rows; "
                     f"found {len(q)} queries, {len(corpus)} rows")
  extra = 0 if own is None else 1  # one more id, to drop the query's own row

  def top(ids):
    return ids if own is None else calibrate.without_rows(ids, own, k)

  truth = top(ExactIndex(corpus).search(q, k + extra)[0])
  found = calibrate.choose_leaves(
      lambda leaves: calibrate.recall_at_k(top(index.search(q, k + extra, leaves)[0]), truth),
      p.num_leaves, p.target_recall)
  record = {"k": k, "queries": len(q), "source": source, **found}
  return dataclasses.replace(p, leaves_to_search=found["leaves_to_search"], calibration=record)


# ------------------------------------------------------------------ one shard per process

def _staging(path: str) -> str:
  """The directory every process writes its shard into before process 0 publishes `path`."""
  path = os.path.abspath(path)
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.shards")


def save_shard(index, path: str, shard: int, offset: int) -> None:
  """Writes the index of corpus rows [offset, offset + index.size) as shard `shard` of `path`.

  Each process calls it for its own shard (temp + rename: a shard is whole or absent); then
  one process calls `publish_shards`. `path`'s parent must be shared by the processes.
  """
  staging = _staging(path)
  os.makedirs(staging, exist_ok=True)
  final = os.path.join(staging, f"shard-{shard:05d}")
  tmp = tempfile.mkdtemp(prefix=f".shard-{shard:05d}.", dir=staging)
  try:
    body = os.path.join(tmp, "index")
    meta = _write(index, body)
    _write_meta(body, {**meta, "offset": int(offset)})
    if os.path.exists(final):  # left by an earlier, interrupted build
      shutil.rmtree(final)
    os.rename(body, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def publish_shards(path: str, num_shards: int, identity: dict, arrays: dict | None = None) -> dict:
  """Makes the shards written by `save_shard` the index at `path` (read by `load` as one
  ShardedIndex, or by `load_shard` one shard per process); returns its metadata.

  Raises:
    ValueError: a shard is missing, or the shards do not cover rows [0, N) in order.
  """
  staging = _staging(path)
  metas = []
  for j in range(num_shards):
    meta_path = os.path.join(staging, f"shard-{j:05d}", _META)
    if not os.path.isfile(meta_path):
      raise ValueError(f"{path}: shard {j} of {num_shards} was not written ({meta_path})")
    with open(meta_path) as f:
      metas.append(json.load(f))
  offsets = [m["offset"] for m in metas]
  ends = [m["offset"] + m["size"] for m in metas]
  if offsets[0] != 0 or offsets[1:] != ends[:-1] or len({m["dim"] for m in metas}) != 1:
    raise ValueError(f"{path}: shards must cover rows [0, N) in order with one embedding size; "
                     f"found rows {list(zip(offsets, ends))}, dims {[m['dim'] for m in metas]}")
  for name in os.listdir(staging):  # shards of an earlier build with more processes
    if name.startswith("shard-") and int(name[6:11]) >= num_shards:
      shutil.rmtree(os.path.join(staging, name))
  meta = {"kind": ShardedIndex.kind, "size": ends[-1], "dim": metas[0]["dim"], "offsets": offsets,
          "identity": identity, "arrays": sorted(arrays or {})}
  for name, value in (arrays or {}).items():
    np.save(os.path.join(staging, f"{name}.npy"), value)
  _write_meta(staging, meta)
  path = os.path.abspath(path)
  old = None
  if os.path.exists(path):  # replaced as `save` replaces an index
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(path))
    os.rename(path, os.path.join(old, "index"))
  os.rename(staging, path)
  if old:
    shutil.rmtree(old, ignore_errors=True)
  return meta


def save_multihost(local_index, path: str, offset: int, identity: dict,
                   arrays: dict | None = None) -> None:
  """Every process saves its own shard (rows [offset, offset + size)); process 0 publishes.

  Called by all processes alike; returns once the index at `path` is complete.
  """
  from jax.experimental import multihost_utils  # noqa: PLC0415
  save_shard(local_index, path, jax.process_index(), offset)
  multihost_utils.sync_global_devices(f"rerank index shards written: {path}")
  if jax.process_index() == 0:
    publish_shards(path, jax.process_count(), identity, arrays)
  multihost_utils.sync_global_devices(f"rerank index published: {path}")


def load_shard(path: str, shard: int):
  """(index of shard `shard`, its row offset) of a sharded index: what one process searches
  with `search_multihost`, never reading the other shards."""
  meta = read_meta(path)
  if meta.get("kind") != ShardedIndex.kind or not 0 <= shard < len(meta["offsets"]):
    raise ValueError(f"{path}: expected a sharded index with a shard {shard}; found "
                     f"{meta.get('kind')!r} with {len(meta.get('offsets', []))} shard(s)")
  return _read(os.path.join(path, f"shard-{shard:05d}")), meta["offsets"][shard]


# ------------------------------------------------------------------ build, save, load

def resolve_backend(n: int, backend: str = "auto", cfg=None) -> str:
  """The backend `build` uses for n items: "auto" is exact up to cfg.exact_max, else scann."""
  if backend not in BACKENDS:
    raise ValueError(f"index backend: expected one of {BACKENDS}; found {backend!r}")
  if backend == "auto":
    exact_max = (cfg.get("exact_max") if cfg is not None else None) or 20_000
    return "exact" if n <= exact_max else "scann"
  return backend


def build(embeddings, backend: str = "auto", cfg=None, queries=None):
  """An index over [N, D] unit embeddings; `cfg` is config.index (backend fields, ScaNN params).

  `queries` ([Q, D], optional): held-out queries for ScaNN's target-recall calibration.
  """
  x = _as_unit_matrix(embeddings)
  backend = resolve_backend(len(x), backend, cfg)
  if backend == "exact":
    return ExactIndex(x)
  if backend == "jax":
    return JaxIndex(x)
  return ScannIndex.build(x, scann_params(len(x), cfg), queries)


_KINDS = {c.kind: c for c in (ExactIndex, JaxIndex, ScannIndex, ShardedIndex)}


def _write(index, path):
  os.makedirs(path)
  meta = {"kind": index.kind, "size": int(index.size), "dim": int(index.dim)}
  meta.update(index._save(path))  # noqa: SLF001
  _write_meta(path, meta)
  return meta


def _write_meta(path, meta):
  with open(os.path.join(path, _META), "w") as f:
    json.dump(meta, f, indent=2)


def _read(path):
  with open(os.path.join(path, _META)) as f:
    meta = json.load(f)
  return _KINDS[meta["kind"]]._load(path, meta)  # noqa: SLF001


def save(index, path: str, identity: dict, arrays: dict | None = None) -> None:
  """Writes index + `identity` (checkpoint, fingerprint, dim, ...) + extra arrays to `path`.

  Everything goes to a temporary sibling directory that is renamed into place at the end, so
  `path` never holds a half-written index; an existing index at `path` is replaced.
  """
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
  try:
    body = os.path.join(tmp, "index")
    meta = _write(index, body)
    meta["identity"] = identity
    for name, value in (arrays or {}).items():
      np.save(os.path.join(body, f"{name}.npy"), value)
    meta["arrays"] = sorted(arrays or {})
    _write_meta(body, meta)
    old = None
    if os.path.exists(path):
      old = os.path.join(tmp, "old")
      os.rename(path, old)
    os.rename(body, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, _META)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{meta_path}: no index here; build one with python -m rerank.index")
  with open(meta_path) as f:
    return json.load(f)


def load(path: str, expect: dict | None = None):
  """(index, meta, arrays) from `path`; every key of `expect` must equal the saved identity's.

  Raises:
    IndexMismatchError: the index was built from another checkpoint or embedding size.
  """
  meta = read_meta(path)
  saved = meta.get("identity", {})
  for key, want in (expect or {}).items():
    if saved.get(key) != want:
      raise IndexMismatchError(
          f"{path}: index built with {key}={saved.get(key)!r} but this model has {key}={want!r}; "
          f"rebuild it with python -m rerank.index --checkpoint=... --out={path}")
  arrays = {name: np.load(os.path.join(path, f"{name}.npy")) for name in meta.get("arrays", [])}
  return _read(path), meta, arrays
