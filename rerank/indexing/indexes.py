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
`load(..., expect=...)` refuses an index from another checkpoint or embedding size. index.json
lists every file with its size and sha256; `load` reads only listed files that match, never
unpickles, and refuses non-finite embeddings (see "checked reading" below).
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile

import jax
import numpy as np

from rerank import errors
from rerank.indexing import calibrate
from rerank.indexing import ranking

BACKENDS = ("auto", "exact", "scann", "jax")
_META = "index.json"
_SCORE_BLOCK = 1 << 26  # floats; bounds the [queries, N] score block of brute force (256 MB)


class IndexMismatchError(errors.UserError):
  """The saved index was built from another checkpoint or embedding size."""


class IndexFormatError(errors.UserError):
  """An index directory that is not what `save` wrote: the message names the file and why."""


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
    return cls(_load_embeddings(path, meta, mmap=True))


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
    block = meta.get("query_block", 256)
    if not _is_count(block, 1) or block > _MAX_QUERY_BLOCK:
      raise IndexFormatError(f"{os.path.join(path, _META)}: query_block: expected an integer in "
                             f"[1, {_MAX_QUERY_BLOCK}]; found {block!r:.40}")
    return cls(_load_embeddings(path, meta, mmap=False), block)


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
    params = _scann_params_from_meta(path, meta)
    # ScaNN's loader unpickles scann/scann_docids.pkl when that file exists, so it never sees
    # the index directory: only the files index.json lists (never a .pkl) are copied, checked,
    # into a private directory, and ScaNN loads from there.
    private = tempfile.mkdtemp(prefix="rerank-scann-")
    try:
      _copy_scann_assets(path, meta, private)
      searcher = scann.scann_ops_pybind.load_searcher(private, assets_backcompat_shim=False)
    finally:
      shutil.rmtree(private, ignore_errors=True)
    return cls(searcher, meta["size"], meta["dim"], params)


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
    offsets = meta.get("offsets")
    if not (isinstance(offsets, list) and offsets and all(
        isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
      raise IndexFormatError(f"{os.path.join(path, _META)}: offsets: expected a non-empty list of "
                             f"row offsets; found {offsets!r:.80}")
    shards = [_read(os.path.join(path, f"shard-{j:05d}")) for j in range(len(offsets))]
    starts = [0] + [int(v) for v in np.cumsum([s.size for s in shards])[:-1]]
    if offsets != starts or sum(s.size for s in shards) != meta["size"]:
      raise IndexFormatError(f"{os.path.join(path, _META)}: offsets: expected {starts} for shards of "
                             f"{[s.size for s in shards]} rows ({meta['size']} in all); found {offsets}")
    return cls(shards, offsets)


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
  for file in _float_corpus_files(path):  # an index load would refuse: refuse to write it
    row = _first_nonfinite_row(np.load(file, mmap_mode="r"))
    if row is not None:
      raise ValueError(f"embeddings: expected finite rows; found NaN or inf in row {row}")
  _write_meta(path, meta)
  return meta


def _write_meta(path, meta):
  """index.json, with the size and sha256 of every file the index holds (`load` checks them)."""
  meta["files"] = _manifest(path)
  with open(os.path.join(path, _META), "w") as f:
    json.dump(meta, f, indent=2)


def _read(path):
  meta = read_meta(path)
  _verify_files(path, meta)
  return _KINDS[meta["kind"]]._load(path, meta)  # noqa: SLF001


def save(index, path: str, identity: dict, arrays: dict | None = None,
         texts: dict | None = None) -> None:
  """Writes index + `identity` (checkpoint, fingerprint, dim, ...) + extra arrays to `path`.

  `arrays`: name -> array (a memmap too), saved as NAME.npy and returned by `load`. `texts`:
  file name -> text, small files for people to read (e.g. the files a folder index skipped);
  listed and checksummed in index.json like every file, never read back by `load`.
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
    for name, text in (texts or {}).items():
      if os.path.basename(name) != name or name in (_META, ".", "..") or name.endswith(".npy"):
        raise ValueError(f"texts: expected plain file names (not {_META}, not .npy); found {name!r}")
      with open(os.path.join(body, name), "w", encoding="utf-8") as f:
        f.write(text)
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
  """index.json of the index in `path`, its kind, size, dim and file list checked.

  Raises:
    FileNotFoundError: no index.json in `path`.
    IndexFormatError: index.json is not what `save` writes (the message names it).
  """
  meta_path = os.path.join(path, _META)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{meta_path}: no index here; build one with python -m rerank.index")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise IndexFormatError(f"{meta_path}: expected the JSON that python -m rerank.index writes; "
                           f"found invalid JSON ({e})") from e
  _check_meta(meta_path, meta)
  return meta


def load(path: str, expect: dict | None = None, mmap_arrays=()):
  """(index, meta, arrays) from `path`; every key of `expect` must equal the saved identity's.

  The arrays named in `mmap_arrays` are memory-mapped (read-only) rather than read whole: a
  folder index's cached image states can be far larger than memory.

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
  index = _read(path)  # checks every file against index.json first
  arrays = {name: _load_npy(os.path.join(path, f"{name}.npy"), mmap=name in mmap_arrays)
            for name in meta.get("arrays", [])}
  return index, meta, arrays


# ------------------------------------------------------------------ checked reading
# Every file of an index is listed in its index.json with its size and sha256 (`_write_meta`);
# `load` reads nothing that is not listed or does not match, and never unpickles: `.npy` files
# load with allow_pickle=False and ScaNN only ever sees a private copy of its listed assets.

_SCANN_ASSET_SUFFIXES = (".pb", ".pbtxt", ".npy")  # what ScaNN's serialize writes; never .pkl
_HASH_BLOCK = 1 << 22  # bytes read at a time while hashing or copying
_MAX_QUERY_BLOCK = 1 << 16  # a JaxIndex pads queries to this many rows: bounds its memory


def _manifest(path: str) -> dict:
  """{relative path: {"bytes", "sha256"}} of the files in `path`, bar index.json and the
  directories of nested indexes (shards), which list their own files."""
  out = {}
  for root, dirs, files in os.walk(path):
    if root != path and os.path.isfile(os.path.join(root, _META)):
      dirs[:] = []
      continue
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      if full == os.path.join(path, _META):
        continue
      digest, nbytes = _sha256(full)
      out[os.path.relpath(full, path).replace(os.sep, "/")] = {"bytes": nbytes, "sha256": digest}
  return out


def _sha256(path: str, copy_to: str | None = None) -> tuple[str, int]:
  """(hex sha256, size) of a file; with `copy_to`, the bytes hashed are also written there."""
  h, n = hashlib.sha256(), 0
  with open(path, "rb") as f, (open(copy_to, "xb") if copy_to else contextlib.nullcontext()) as out:
    while chunk := f.read(_HASH_BLOCK):
      h.update(chunk)
      n += len(chunk)
      if out is not None:
        out.write(chunk)
  return h.hexdigest(), n


def _is_count(v, least: int = 0) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _check_meta(meta_path: str, meta) -> None:
  """IndexFormatError naming index.json and the field that is not what `save` writes."""
  def bad(field, expected, found):
    raise IndexFormatError(f"{meta_path}: {field}: expected {expected}; found {json.dumps(found)[:80]}")
  if not isinstance(meta, dict):
    bad("the file", "a JSON object", meta)
  if meta.get("kind") not in _KINDS:
    bad("kind", f"one of {', '.join(_KINDS)}", meta.get("kind"))
  for field in ("size", "dim"):
    if not _is_count(meta.get(field), 1):
      bad(field, "an integer >= 1", meta.get(field))
  if "files" not in meta:
    raise IndexFormatError(f"{meta_path}: no file checksums (an index written by an older rerank); "
                           f"rebuild it with python -m rerank.index --out={os.path.dirname(meta_path)}")
  files = meta["files"]
  if not isinstance(files, dict):
    bad("files", "an object of file checksums", files)
  for name, entry in files.items():
    parts = name.split("/")
    if os.path.isabs(name) or "\\" in name or any(p in ("", ".", "..") for p in parts):
      bad("files", "paths inside the index directory", name)
    if not (isinstance(entry, dict) and _is_count(entry.get("bytes"))
            and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
      bad(f"files[{name!r}]", "{\"bytes\": N, \"sha256\": HEX}", entry)
  arrays = meta.get("arrays", [])
  if not (isinstance(arrays, list) and all(isinstance(a, str) and f"{a}.npy" in files for a in arrays)):
    bad("arrays", "names of .npy files listed in files", arrays)
  if "identity" in meta and not isinstance(meta["identity"], dict):
    bad("identity", "an object", meta["identity"])


def _verify_files(path: str, meta: dict) -> None:
  """IndexFormatError unless every file index.json lists is there with its size and sha256."""
  for name, entry in sorted(meta["files"].items()):
    full = os.path.join(path, *name.split("/"))
    if not os.path.isfile(full):
      raise IndexFormatError(f"{full}: missing, but {_META} lists it; the index is incomplete: "
                             "rebuild it with python -m rerank.index")
    _check_entry(full, entry, _sha256(full))


def _check_entry(full: str, entry: dict, found: tuple[str, int]) -> None:
  digest, nbytes = found
  if (digest, nbytes) != (entry["sha256"], entry["bytes"]):
    raise IndexFormatError(
        f"{full}: expected {entry['bytes']} bytes with sha256 {entry['sha256'][:16]}... as {_META} "
        f"records; found {nbytes} bytes with sha256 {digest[:16]}...: the file changed after the "
        "index was written; rebuild it with python -m rerank.index")


def _load_npy(path: str, mmap: bool = False) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except ValueError as e:  # object arrays (pickles) and malformed headers
    raise IndexFormatError(f"{path}: expected a plain NumPy array; found {e}") from e


def _first_nonfinite_row(x: np.ndarray, block: int = 1 << 16) -> int | None:
  """The first row of [N, D] `x` holding NaN or inf, or None (in blocks: x may be mmap'd)."""
  for a in range(0, len(x), block):
    ok = np.isfinite(x[a:a + block]).all(axis=1)
    if not ok.all():
      return a + int(np.argmin(ok))
  return None


def _check_finite_rows(path: str, x: np.ndarray) -> None:
  row = _first_nonfinite_row(x)
  if row is not None:
    raise IndexFormatError(f"{path}: expected finite embeddings; found NaN or inf in row {row}")


def _float_corpus_files(path: str) -> list[str]:
  """The files holding an index's float corpus: what must be finite."""
  return [f for f in (os.path.join(path, "embeddings.npy"), os.path.join(path, "scann", "dataset.npy"))
          if os.path.isfile(f)]


def _load_embeddings(path: str, meta: dict, mmap: bool) -> np.ndarray:
  """embeddings.npy of an exact / jax index: float32 [size, dim], every row finite."""
  file = os.path.join(path, "embeddings.npy")
  x = _load_npy(file, mmap)
  if x.dtype != np.float32 or x.shape != (meta["size"], meta["dim"]):
    raise IndexFormatError(f"{file}: expected float32 [{meta['size']}, {meta['dim']}] as {_META} "
                           f"records; found {x.dtype} {list(x.shape)}")
  _check_finite_rows(file, x)
  return x


def _scann_params_from_meta(path: str, meta: dict) -> ScannParams:
  """ScannParams from index.json: known fields only, numbers where the field is a number."""
  fields = {f.name: f.type for f in dataclasses.fields(ScannParams)}
  given = meta.get("scann")
  is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
  if not (isinstance(given, dict) and set(given) <= set(fields) and all(
      is_number(v) for k, v in given.items() if fields[k] in (int, float))):
    raise IndexFormatError(f"{os.path.join(path, _META)}: scann: expected the fields "
                           f"{', '.join(fields)} (numbers where numeric); found {json.dumps(given)[:80]}")
  try:
    return ScannParams(**given)
  except TypeError as e:
    raise IndexFormatError(f"{os.path.join(path, _META)}: scann: {e}") from e


def _copy_scann_assets(path: str, meta: dict, private: str) -> None:
  """Copies the ScaNN assets index.json lists into `private`, checking each copy's sha256."""
  assets = {n[len("scann/"):]: e for n, e in meta["files"].items() if n.startswith("scann/")}
  for name, entry in sorted(assets.items()):
    if "/" in name or not name.endswith(_SCANN_ASSET_SUFFIXES):
      raise IndexFormatError(f"{os.path.join(path, 'scann', name)}: expected only ScaNN assets "
                             f"({', '.join(_SCANN_ASSET_SUFFIXES)}) in {_META}; refusing to load it")
    src = os.path.join(path, "scann", name)
    _check_entry(src, entry, _sha256(src, copy_to=os.path.join(private, name)))
  pbtxt = os.path.join(private, "scann_assets.pbtxt")
  if not os.path.isfile(pbtxt):
    raise IndexFormatError(f"{os.path.join(path, 'scann')}: expected scann_assets.pbtxt in {_META}; "
                           "found none")
  with open(pbtxt, encoding="utf-8", errors="replace") as f:
    named = re.findall(r'asset_path:\s*"([^"]*)"', f.read())
  outside = [a for a in named if a not in assets]
  if outside:
    raise IndexFormatError(f"{os.path.join(path, 'scann', 'scann_assets.pbtxt')}: expected asset "
                           f"paths among the listed files; found {outside[0]!r}")
  dataset = os.path.join(private, "dataset.npy")
  if os.path.isfile(dataset):  # the float corpus ScaNN reorders with
    shown = os.path.join(path, "scann", "dataset.npy")
    x = _load_npy(dataset, mmap=True)
    if x.shape != (meta["size"], meta["dim"]):
      raise IndexFormatError(f"{shown}: expected [{meta['size']}, {meta['dim']}] as {_META} records; "
                             f"found {list(x.shape)}")
    _check_finite_rows(shown, x)
