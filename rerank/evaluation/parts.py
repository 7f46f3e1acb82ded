"""Finished parts of an evaluation kept on disk, so a preempted evaluation continues where it was.

A full CE evaluation is hours of work (the COCO 5k cross product). The final evaluation splits
it into parts (BE embeddings of each side, CE and RR score chunks of a few thousand queries)
and stores each finished part under `DIR/eval_parts/<key>/`, where the key hashes what decides
the numbers (checkpoint, split, eval settings). SIGTERM between parts stops the evaluation
(`Interrupted`); the same command then loads the stored parts and computes only the rest.
The directory is removed once results.json is written.

Every process calls the same parts in the same order: process 0 decides whether a part exists
and tells the others (one broadcast), process 0 writes it (temp file + rename), and all of
them stop at the same part when any of them received SIGTERM (jax's preemption sync point).
"""

import hashlib
import json
import os
import shutil
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np


class Interrupted(Exception):
  """SIGTERM arrived during an evaluation; its finished parts are stored."""


class Sigterm:
  """SIGTERM -> `stop()` turns True at the next part boundary (`reached(step)`: at the next
  training step), on every process at once. Leaving the `with` block puts the previous handler
  back, so a later SIGTERM ends the process at once.

  One process: a Python handler sets a flag. Several: jax's preemption service (started by
  `jax.distributed.initialize`) catches SIGTERM on any host and `reached_preemption_sync_point`
  turns True on all of them at the same call; `first` is above every sync step used before
  (the trainer's last step).
  """

  def __init__(self, first: int = 0):
    self.requested = False
    self.multihost = jax.process_count() > 1
    self.calls = first
    self._previous = None

  def __enter__(self):
    if not self.multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Call with increasing steps on every process; True when this step must be the last
    (the trainer checkpoints at it and stops)."""
    if self.multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __call__(self) -> bool:
    """True when the next part must not start (one call per part boundary, every process)."""
    self.calls += 1
    return self.reached(self.calls)


def key_of(fields: dict) -> str:
  """A short hash of what decides an evaluation's numbers."""
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class Parts:
  """Named parts ({name: array}) computed once: `get(name, compute)`.

  Args:
    root: the directory to keep parts under (`root/eval_parts/<key>/`); None keeps nothing
      and never stops (dev evaluation).
    fields: what decides the numbers (hashed into the key; written beside the parts).
    stop: called before computing each part; True raises `Interrupted`.
    log: gets one line per reused part.
  """

  def __init__(self, root: str | None = None, fields: dict | None = None, stop=None, log=print,
               prefix: str = ""):
    self.dir = None if root is None else os.path.join(root, "eval_parts", key_of(fields or {}))
    self.fields, self.stop, self.log, self.prefix = fields or {}, stop, log, prefix
    self.reused: list[str] = []

  def sub(self, prefix: str) -> "Parts":
    """The same store with names under `prefix` (one set of a fold mean)."""
    child = Parts(None, self.fields, self.stop, self.log, self.prefix + prefix + "/")
    child.dir, child.reused = self.dir, self.reused
    return child

  def get(self, name: str, compute) -> dict[str, np.ndarray]:
    """`compute()` -> {field: array}, or the stored result of an earlier run."""
    name = self.prefix + name
    path = None if self.dir is None else os.path.join(self.dir, name.replace("/", "__") + ".npz")
    if path is not None and _agreed(os.path.isfile(path)):
      with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
      self.reused.append(name)
      self.log(f"reused stored part {name} ({os.path.dirname(path)})")
      return out
    if self.stop is not None and self.stop():
      raise Interrupted(name)
    out = {k: np.asarray(v) for k, v in compute().items()}
    if path is not None and jax.process_index() == 0:
      _write(path, out, self.fields)
    return out

  def discard(self) -> None:
    """Removes the stored parts (results.json is written; nothing left to continue)."""
    if self.dir is not None and jax.process_index() == 0:
      shutil.rmtree(self.dir, ignore_errors=True)
      try:
        os.rmdir(os.path.dirname(self.dir))  # eval_parts/ itself, unless other parts remain
      except OSError:
        pass


def _agreed(flag: bool) -> bool:
  """Process 0's `flag` on every process (the parts directory may lag on other hosts)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _write(path: str, arrays: dict, fields: dict) -> None:
  """Writes `path` atomically (temp file in the same directory, then rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  meta = os.path.join(os.path.dirname(path), "key.json")
  if not os.path.exists(meta):
    tmp = f"{meta}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(fields, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, meta)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def timed(compute, clock=time.perf_counter):
  """compute() -> {fields..., "seconds": its time by `clock`}: a reused part keeps the time it
  took. The clock is read right before and right after compute(), nothing else between."""
  def run():
    t0 = clock()
    out = dict(compute())
    out["seconds"] = np.float64(clock() - t0)
    return out
  return run
