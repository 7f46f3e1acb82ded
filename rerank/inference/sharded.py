"""Sharded inference: BE encoding and CE pair scoring as one jitted program over a device mesh.

`Engine` runs on one device from a whole copy of the parameters. `ShardedEngine` runs the same
three verbs over the training mesh (`rerank.training.sharding`): parameters laid out by the
config's rules (an FSDP model is never whole on one device), each batch split over the batch
axis across every device of every process. The rows are partitioned between processes:

- Each process owns the batch slots its devices hold (the first process holding a slot owns
  it) and scores a contiguous share of the work: `score_pairs(..., groups=Q)` gives every
  owner whole groups (a query's k or corpus-size pairs), so each process scores about 1/P of
  the pairs; embeddings split the rows the same way.
- Every process builds the same global batch (row indices only), and the jitted call reads
  the text and region features of a slot only on the process that holds it
  (`jax.make_array_from_callback`), so a host reads only its own rows' features.
- Text widths are trimmed per global batch to the longest text rounded up to 8 and short
  chunks are padded with their first row, as `Engine` does; one process with all the slots
  therefore runs exactly `Engine`'s batches.
- Results are gathered once at the end (`process_allgather`), so every process returns the
  whole output; `last_counts` says how many rows each process computed (results.json's
  `pairs_scored`).

`search` is the exact (or configured) first stage over a corpus split between processes: each
process indexes its contiguous share, and the per-share top-k are merged (ties to the lower id,
as one exact index over everything).
"""

import importlib
import sys

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
import numpy as np
import tqdm

from rerank.indexing import indexes as index_lib
from rerank.inference import engine
from rerank.models import modes
from rerank.training import sharding

_PROGRESS_MIN_ROWS = 20_000


# ------------------------------------------------------------------ layout

def param_shardings(model, mode, mesh, rules):
  """NamedShardings of the mode's parameter tree by the logical axes the model declares."""
  cfg = model.cfg
  if hasattr(cfg, "region_width"):
    image_input = (np.zeros((1, 1, cfg.region_width), np.float32), np.ones((1, 1), bool))
  else:  # a pixel family (rerank/models/pixels.py): one image on its canvas
    image_input = importlib.import_module(type(model).__module__).example_images(cfg, 1)
  dummy = (np.zeros((1, 8), np.int32), np.ones((1, 8), bool), *image_input)
  boxed = jax.eval_shape(lambda r: model.init(r, *dummy)["params"], jax.random.PRNGKey(0))
  trees = modes.get(mode).param_trees
  if trees:
    boxed = {name: boxed for name in trees}
  return sharding.tree_shardings(boxed, sharding.ordered_rules(rules), mesh)


def place(tree, shardings):
  """`tree` laid out by `shardings` (matched by path; a leaf they do not name is replicated: a
  converted checkpoint has no CE head): host arrays are copied slice by slice (each process its
  own devices' slices), device arrays resharded by one jitted identity."""
  table = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
  whole = NamedSharding(next(iter(table.values())).mesh, jax.sharding.PartitionSpec())

  def one(path, x):
    sh = table.get(path, whole)
    if isinstance(x, jax.Array) and x.sharding == sh:
      return x
    if isinstance(x, jax.Array) and not (x.is_fully_addressable and jax.process_count() > 1):
      return jax.jit(lambda a: a, out_shardings=sh)(x)
    x = np.asarray(x)  # a host copy (every process holds the same)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
  return jax.tree_util.tree_map_with_path(one, tree)


def slot_owners(batch_sharding: NamedSharding, size: int) -> np.ndarray:
  """[size] the process that computes each batch slot: the lowest process holding it."""
  owner = np.full(size, np.iinfo(np.int32).max, np.int64)
  for device, idx in batch_sharding.devices_indices_map((size,)).items():
    sl = idx[0]
    owner[sl] = np.minimum(owner[sl], device.process_index)
  return owner


# ------------------------------------------------------------------ the engine

class ShardedEngine(engine.Engine):
  """`Engine` over a mesh: the same verbs and results, the work split over all devices.

  Args:
    model, mode, batch_size, params, normalize: as `Engine`; the global batch is batch_size
      rounded up to a multiple of the batch axis' ways.
    mesh: the devices (the trainer passes its training mesh).
    rules: config.rules (or ordered pairs): where parameters and the batch axis live.
  """

  def __init__(self, model, mode, batch_size: int, mesh, rules, params=None,
               normalize: bool = True):
    self.mesh, self.rules = mesh, sharding.ordered_rules(rules)
    self.batch = sharding.batch_sharding(mesh, self.rules)
    ways = sharding.batch_divisor(mesh, self.rules)
    self._shardings = param_shardings(model, mode, mesh, self.rules)
    super().__init__(model, mode, -(-batch_size // ways) * ways, None, normalize)
    self.owner = slot_owners(self.batch, self.batch_size)  # [B] process of each slot
    self.processes = sorted(set(self.owner.tolist()))  # the processes that compute anything
    self.last_counts = [0] * jax.process_count()  # rows each process computed in the last call
    post = engine._unit if normalize else (lambda x: x)  # noqa: SLF001
    out = dict(out_shardings=self.batch)
    self._text = jax.jit(lambda p, t, m: post(engine.text_embeddings(model, p, t, m)), **out)
    self._image = jax.jit(lambda p, r, m: post(engine.image_embeddings(model, p, r, m)), **out)
    self._pairs = jax.jit(
        lambda p, t, tm, r, rm: engine.pair_logits(model, p, t, tm, r, rm)[:, 1], **out)
    if params is not None:
      self.set_params(params)

  @property
  def devices(self) -> int:
    return self.mesh.devices.size

  def set_params(self, params) -> "ShardedEngine":
    """Uses `params` (the mode's whole tree), placed by the rules unless already on the mesh."""
    return super().set_params(place(params, self._shardings))

  def score_pairs(self, token_ids, text_mask, regions, region_mask, desc: str | None = None,
                  groups: int | None = None) -> np.ndarray:
    """As `Engine.score_pairs`; `groups` (dividing the pair count) keeps groups whole per process."""
    return self._map(self._pairs, "CE", (token_ids, text_mask, regions, region_mask), desc,
                     groups=groups)

  def _map(self, fn, part: str, arrays, desc, has_text: bool = True, groups=None) -> np.ndarray:
    params = self.be_params if part == "BE" else self.ce_params
    if params is None:
      raise ValueError(f"mode {self.mode.name!r} has no {part}, or set_params was never called")
    n = arrays[0].shape[0]
    shares = self._shares(n, groups)  # process -> [start, stop) of its rows
    mine = shares.get(jax.process_index(), (0, 0))
    local = []
    bar = tqdm.tqdm(total=mine[1] - mine[0], desc=desc, unit="row", file=sys.stderr, mininterval=2.0,
                    disable=desc is None or n < _PROGRESS_MIN_ROWS or jax.process_index())
    for positions, own in self._plan(shares):
      width = _text_width(arrays[1], positions) if has_text else None
      inputs = [_global_input(a, positions, self.batch, width if j < 2 else None)
                for j, a in enumerate(arrays)]
      local.append(_own_rows(fn(params, *inputs), own))
      bar.update(len(own[1]) if own is not None else 0)
    bar.close()
    self.last_counts = [shares.get(p, (0, 0))[1] - shares.get(p, (0, 0))[0]
                        for p in range(jax.process_count())]
    width = engine.embed_dim(self.model) if part == "BE" else None
    local = _concat(local, mine[1] - mine[0], width)
    return _gather(local, shares, n, width)

  def _shares(self, n: int, groups: int | None) -> dict[int, tuple[int, int]]:
    """Process -> its contiguous rows: whole groups, as evenly as the groups allow."""
    groups = n if groups is None else groups
    if groups and n % groups:
      raise ValueError(f"groups: expected a divisor of the {n} rows; found {groups}")
    per = n // groups if groups else 0
    out = {}
    for i, p in enumerate(self.processes):
      a, b = index_lib.shard_rows(groups, len(self.processes), i)
      out[p] = (a * per, b * per)
    return out

  def _plan(self, shares):
    """Yields (positions [B] row of each batch slot, rows {slot: row} of this process's real rows).

    Every process computes the same plan. An owner's chunk is padded with its first row; an
    owner with nothing left repeats its share's first row (or row 0), as Engine pads.
    """
    slots = {p: np.flatnonzero(self.owner == p) for p in self.processes}
    steps = max((-(-(b - a) // len(slots[p])) for p, (a, b) in shares.items()), default=0)
    me = jax.process_index()
    for s in range(steps):
      positions = np.zeros(self.batch_size, np.int64)
      own = None
      for p, (a, b) in shares.items():
        c = len(slots[p])
        chunk = np.arange(a + s * c, min(a + (s + 1) * c, b))
        if p == me:
          own = (slots[p][:len(chunk)], chunk)
        fill = chunk[0] if len(chunk) else (a if b > a else 0)
        positions[slots[p]] = np.concatenate([chunk, np.full(c - len(chunk), fill, np.int64)])
      yield positions, own


def _text_width(text_mask, positions) -> int:
  """The trimmed width of one global batch (every process computes the same)."""
  mask = np.asarray(text_mask[positions])
  return engine.trim_text(mask, mask)[0].shape[1]


def _global_input(a, positions, batch_sharding, width=None):
  """The global [B, ...] array of rows `positions` of `a`; each process reads only the slots its
  devices hold (a `LazyRows` reads nothing else), each slice once."""
  shape = (len(positions), *a.shape[1:])
  if width is not None:
    shape = (shape[0], width, *shape[2:])
  cache = {}

  def read(idx):
    key = (idx[0].start, idx[0].stop)
    if key not in cache:
      x = np.asarray(a[positions[idx[0]]])
      cache[key] = x[:, :width] if width is not None else x
    return cache[key][(slice(None), *idx[1:])]
  return jax.make_array_from_callback(shape, batch_sharding, read)


def _own_rows(out: jax.Array, own):
  """This process's real rows of a batch-sharded output, in row order."""
  if own is None or not len(own[0]):
    return None
  host = np.empty(out.shape, out.dtype)  # only the slots held here are filled
  for shard in out.addressable_shards:  # replicas along other mesh axes hold equal values
    host[shard.index[0]] = np.asarray(shard.data)
  return host[own[0]]


def _concat(parts, n: int, width):
  parts = [p for p in parts if p is not None]
  if not parts:
    return np.zeros((0, width) if width else (0,), np.float32)
  out = np.concatenate(parts).astype(np.float32, copy=False)
  assert len(out) == n, (len(out), n)
  return out


def _gather(local: np.ndarray, shares, n: int, width) -> np.ndarray:
  """Every process's share -> the whole [n, ...] output on every process (one collective)."""
  if jax.process_count() == 1:
    return local
  most = max(b - a for a, b in shares.values())
  padded = np.zeros((most, *local.shape[1:]), np.float32)
  padded[:len(local)] = local
  every = np.asarray(multihost_utils.process_allgather(padded))  # [P, most, ...]
  out = np.zeros((n, width) if width else (n,), np.float32)
  for p, (a, b) in shares.items():
    out[a:b] = every[p][:b - a]
  return out


# ------------------------------------------------------------------ search

def search(corpus: np.ndarray, queries: np.ndarray, k: int, backend: str = "exact",
           index_cfg=None) -> np.ndarray:
  """[Q, k] corpus rows nearest each query (every process passes the same arrays and gets the
  same answer): each process indexes its contiguous share, per-share top-k merged."""
  return search_index(build_index(corpus, backend, index_cfg), queries, k)[0]


def build_index(corpus: np.ndarray, backend: str = "exact", index_cfg=None):
  """(index of this process's contiguous share of `corpus`, the share's first row)."""
  a, b = index_lib.shard_rows(len(corpus), jax.process_count(), jax.process_index())
  # A process without rows (a corpus smaller than the process count) offers no candidates.
  local = index_lib.build(corpus[a:b], backend, index_cfg) if b > a else _Empty(corpus.shape[1])
  return local, a


def search_index(index, queries: np.ndarray, k: int):
  """(ids, scores) [Q, k] over every process's share of `build_index`, merged (collective:
  every process calls it with the same queries)."""
  local, offset = index
  return index_lib.search_multihost(local, offset, queries, k)


class _Empty:
  """The index of a process without corpus rows: no candidates."""

  size = 0

  def __init__(self, dim):
    self.dim = dim

  def search(self, queries, k):
    return np.full((len(queries), k), -1, np.int64), np.full((len(queries), k), -np.inf, np.float32)


# ------------------------------------------------------------------ construction

def restore_workdir(workdir: str, latest: bool = False, config=None) -> engine.Restored:
  """`engine.restore_workdir` straight onto the config's mesh (every device of every process)."""
  if config is None:
    config = engine.workdir_config(workdir)
  return engine.restore_workdir(workdir, latest, config, mesh=sharding.make_mesh(config.mesh))


def engine_for(restored: engine.Restored, batch_size: int | None = None, normalize: bool = True,
               mesh=None, rules=None) -> ShardedEngine:
  """A ShardedEngine on a restored model: the mesh it was restored onto, else its config's
  mesh, and its config's rules (a converted checkpoint: data parallel over every device)."""
  config = restored.config
  if batch_size is None:
    batch_size = config.eval.batch_size if config is not None else 64
  if mesh is None:
    mesh = restored.mesh or sharding.make_mesh(config.mesh if config is not None else {"data": -1})
  if rules is None:
    rules = config.rules if config is not None else sharding.RULES["dp"]
  return ShardedEngine(restored.model, restored.mode, batch_size, mesh, rules, restored.params,
                       normalize)

