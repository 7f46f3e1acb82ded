"""Per-host training input: every process builds only its slice of the global batch.

The global batch of step s is a pure function of (seed, s): the captions of
`batches.caption_rows` (epoch-wise seeded permutations, nothing dropped), the same for any
number of hosts. Host p of P takes the contiguous slice [p*B/P, (p+1)*B/P) and reads only
the images of that slice, which is the layout `jax.make_array_from_process_local_data`
expects for a batch sharded over a process-major "data" mesh axis. CE negatives are drawn
from (seed, step) on a single host, exactly as `batches.train_batch`, and from
(seed, step, P, p) on several.

So the iterator's whole state is the next step (plus what it must match on restore), and a
resumed run continues with exactly the batch the uninterrupted run would have read next.
`HostIterator` computes the next few steps in a background thread; the order stays fixed
because each prefetched result belongs to one step number.
"""

import concurrent.futures
import dataclasses

import numpy as np

from rerank.data import batches


@dataclasses.dataclass(frozen=True)
class Host:
  """Which slice of the global batch this process reads."""

  index: int = 0
  count: int = 1

  @classmethod
  def current(cls) -> "Host":
    import jax  # pylint: disable=g-import-not-at-top  # data code runs without jax too
    return cls(jax.process_index(), jax.process_count())


def host_rows(num_texts: int, global_batch: int, seed: int, step: int, host: Host) -> np.ndarray:
  """Caption rows [global_batch / host.count] that `host` reads at `step`."""
  if global_batch % host.count:
    raise ValueError(f"global batch {global_batch} must split evenly over {host.count} hosts")
  if not 0 <= host.index < host.count:
    raise ValueError(f"process index {host.index} outside [0, {host.count})")
  per_host = global_batch // host.count
  rows = batches.caption_rows(num_texts, global_batch, seed, step)
  return rows[host.index * per_host:(host.index + 1) * per_host]


def host_batch(data: batches.RetrievalData, mode: str, global_batch: int, seed: int, step: int,
               host: Host = Host(), mined: dict | None = None, hard_prob: float = 0.0) -> dict:
  """This host's part of training step `step`: {"be": ...} and/or {"ce": ...}.

  BE: per_host captions with their images; CE: 2 * per_host pairs [positives; negatives]
  (see `batches`). With one host this equals `batches.train_batch(...)`.
  """
  rows = host_rows(data.num_texts, global_batch, seed, step, host)
  out = {}
  if mode != "ce":
    out["be"] = batches.be_batch(data, rows)
  if mode != "be":
    keys = (seed, 1, step) if host.count == 1 else (seed, 1, step, host.count, host.index)
    rng = np.random.default_rng(np.random.SeedSequence(list(keys)))
    out["ce"] = batches.ce_batch(data, rows, rng, mined, hard_prob)
  return out


class HostIterator:
  """`next(it)` -> this host's batch of the next step; `get_state`/`set_state` to resume.

  Save `get_state()` (a small JSON-able dict) with the checkpoint of step s - 1 and
  `set_state` it on restore: the next batch is then the batch of step s. Hard negatives
  change the batches: `set_mined` drops what was prefetched with the old ones.
  """

  def __init__(self, data: batches.RetrievalData, mode: str, global_batch: int, seed: int,
               step: int = 0, host: Host | None = None, prefetch: int = 2):
    self.data, self.mode, self.global_batch, self.seed = data, mode, global_batch, seed
    self.host = host or Host.current()
    host_rows(data.num_texts, global_batch, seed, 0, self.host)  # validates the split now
    self.step = step
    self.mined, self.hard_prob = None, 0.0
    self._prefetch = max(int(prefetch), 0)
    self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="input")
                  if self._prefetch else None)
    self._pending = {}  # step -> future

  def _compute(self, step: int) -> dict:
    return host_batch(self.data, self.mode, self.global_batch, self.seed, step, self.host,
                      self.mined, self.hard_prob)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    step = self.step
    if self._pool is None:
      batch = self._compute(step)
    else:
      for s in range(step, step + self._prefetch + 1):
        if s not in self._pending:
          self._pending[s] = self._pool.submit(self._compute, s)
      batch = self._pending.pop(step).result()
    self.step = step + 1
    return batch

  def set_mined(self, mined: dict | None, hard_prob: float):
    """Use these mined negatives from the next step on (see `rerank.mining`)."""
    self._drop_pending()
    self.mined, self.hard_prob = mined, hard_prob

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch,
            "num_texts": self.data.num_texts, "process_count": self.host.count}

  def set_state(self, state: dict):
    """Continue from a saved state; refuses one saved for another split, seed or batch."""
    mine = self.get_state()
    for key in ("seed", "global_batch", "num_texts"):
      if int(state[key]) != mine[key]:
        raise ValueError(f"input state: saved {key}={state[key]} but this run has {mine[key]}; "
                         f"resuming would silently change the data order")
    self._drop_pending()
    self.step = int(state["step"])

  def _drop_pending(self):
    for f in self._pending.values():
      f.cancel()
    for f in self._pending.values():
      if not f.cancelled():
        f.exception()  # wait, so no stale work races the new settings
    self._pending = {}

  def close(self):
    self._drop_pending()
    if self._pool is not None:
      self._pool.shutdown(wait=True)


def to_global(local_batch: dict, sharding) -> dict:
  """Host-local numpy batch -> global jax arrays sharded by `sharding` over all processes."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
