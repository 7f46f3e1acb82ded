"""Nearest-neighbour indexes over unit embeddings: the first stage of retrieve-and-rerank.

Backends, all scoring by dot product (= cosine on unit vectors), all with one verb,
`search(queries [Q, D], k) -> (ids [Q, k] int64, scores [Q, k] float32)`, best first:
- `exact`: NumPy brute force; ties go to the lower id, exactly like `ranking.ranking_from_scores`
  (evaluation with it reproduces the plain `scores = q @ corpus.T` path bit for bit).
- `scann`: ScaNN tree (k-means partitions) + anisotropic hashing + exact float reorder; its
  parameters come from the config or are chosen from the corpus size (`scann_params`).
- `jax`: exact top-k on the accelerator (`lax.top_k`), queries padded to a fixed block.
- `ShardedIndex`: one index per shard (one per host), per-shard top-k merged into the global one.
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

from rerank import errors
from rerank.indexing import ranking

BACKENDS = ("auto", "exact", "scann", "jax")
_META = "index.json"
_SCORE_BLOCK = 1 << 26  # floats; bounds the [queries, N] score block of brute force (256 MB)


class IndexMismatchError(errors.UserError):
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


def scann_params(n: int, cfg=None) -> ScannParams:
  """Fields of `cfg` (config.index) that are > 0 win; the others are chosen from n.

  About 2 * sqrt(n) leaves (1M -> 2000), searching a third of them, reordering 500: on the
  bench's clustered unit embeddings (overlapping clusters, so the true neighbours of a query
  spread over many partitions) that keeps recall@20 >= 0.95 against exact at 1M while still
  searching tens of times faster (see rerank/bench.py). Corpora with tighter clusters can
  search far fewer leaves: set config.index.leaves_to_search.
  """
  get = (lambda name, default: cfg.get(name) or default) if cfg is not None else (lambda _, d: d)
  leaves = int(get("num_leaves", max(1, min(n // 50, int(2 * math.sqrt(n))))))
  leaves = max(1, min(leaves, n))
  search = int(get("leaves_to_search", math.ceil(leaves / 3)))
  return ScannParams(
      num_leaves=leaves, leaves_to_search=min(search, leaves), reorder=int(get("reorder", 500)),
      dims_per_block=int(get("dims_per_block", 2)), aq_threshold=float(get("aq_threshold", 0.2)),
      training_sample=int(get("training_sample", 250_000)))


class ScannIndex:
  kind = "scann"

  def __init__(self, searcher, size: int, dim: int, params: ScannParams):
    self.searcher, self.params = searcher, params
    self.size, self.dim = size, dim

  @classmethod
  def build(cls, embeddings, params: ScannParams | None = None) -> "ScannIndex":
    import scann  # noqa: PLC0415  (a heavy import only this backend needs)
    x = _as_unit_matrix(embeddings)
    p = params or scann_params(len(x))
    builder = scann.scann_ops_pybind.builder(x, min(10, len(x)), "dot_product")
    builder = builder.tree(num_leaves=p.num_leaves, num_leaves_to_search=p.leaves_to_search,
                           training_sample_size=min(p.training_sample, len(x)))
    builder = builder.score_ah(p.dims_per_block, anisotropic_quantization_threshold=p.aq_threshold)
    searcher = builder.reorder(p.reorder).build()
    return cls(searcher, len(x), x.shape[1], p)

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


# ------------------------------------------------------------------ build, save, load

def build(embeddings, backend: str = "auto", cfg=None):
  """An index over [N, D] unit embeddings; `cfg` is config.index (backend fields, ScaNN params)."""
  if backend not in BACKENDS:
    raise ValueError(f"index backend: expected one of {BACKENDS}; found {backend!r}")
  x = _as_unit_matrix(embeddings)
  if backend == "auto":
    exact_max = (cfg.get("exact_max") if cfg is not None else None) or 20_000
    backend = "exact" if len(x) <= exact_max else "scann"
  if backend == "exact":
    return ExactIndex(x)
  if backend == "jax":
    return JaxIndex(x)
  return ScannIndex.build(x, scann_params(len(x), cfg))


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
