"""Training input produced ahead of the step, on a background thread of each host.

The trainer's batch of step s is a pure function of (seed, s) and the mined negatives
(`batches.train_batch`), so producing it early changes nothing but when the work happens:
`Prefetcher` calls `make(step)` for the steps in order, at most `depth` ahead of the consumer,
while the accelerator runs the previous steps. Resuming needs no input state of its own: a
prefetcher started at the resumed step yields the batches the uninterrupted run would have.

`Feed` is the trainer's view: `feed(step, mined)` returns the batch of `step`, restarting the
prefetcher when the mined negatives change (the queued batches drew from the old ones).

The producer's exception is raised in the consumer (at the step whose batch failed, with its
traceback); `close()` (or leaving the `with` block) stops the thread, also when the consumer
stops early with batches still queued.
"""

import queue
import threading
from typing import Any, Callable, Iterable

_END = object()  # the producer ran out of steps


class _Failed:
  """The producer's exception, carried to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """Iterates (step, make(step)) for `steps`, the calls running `depth` ahead on a thread.

  Args:
    make: step -> batch; called on the producer thread only, one step at a time, in order.
    steps: the steps to produce, in the order they are consumed.
    depth: batches produced ahead of the consumer (>= 1).
  """

  def __init__(self, make: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth: expected >= 1; found {depth}")
    self._make, self._steps = make, iter(steps)
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._produce, name="rerank-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    """Queues item unless the consumer closed us first; returns whether it was queued."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self):
    try:
      for step in self._steps:
        if self._stop.is_set() or not self._put((step, self._make(step))):
          return
    except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
      self._put(_Failed(e))
      return
    self._put(_END)

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END or isinstance(item, _Failed):
      self.close()
      if item is _END:
        raise StopIteration
      raise item.error
    return item

  def next_for(self, step: int):
    """The batch of `step`, which must be the next one produced."""
    got, batch = next(self)
    if got != step:
      self.close()
      raise RuntimeError(f"prefetch: expected the batch of step {step}; the next one is {got}")
    return batch

  def close(self):
    """Stops the producer and waits for it (it finishes the batch it is making)."""
    self._done = True
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Feed:
  """step -> batch for a loop over consecutive steps, produced ahead by a `Prefetcher`.

  `feed(step, *args)` returns `make(step, *args)`. The prefetcher runs from `step` to
  `last_step` with those args; a call with other args (compared by identity: the trainer's
  mined negatives are a new dict per mining window) or a step out of order starts a new one.

  Args:
    make: (step, *args) -> batch; runs on the producer thread.
    last_step: the last step the loop asks for.
    depth: batches produced ahead (0 = synchronous: make is called in the caller's thread).
  """

  def __init__(self, make: Callable[..., Any], last_step: int, depth: int = 2):
    self._make, self._last, self._depth = make, last_step, depth
    self._prefetcher, self._args, self._next = None, None, None

  def __call__(self, step: int, *args):
    if not self._depth:
      return self._make(step, *args)
    same = (self._args is not None and len(args) == len(self._args)
            and all(a is b for a, b in zip(args, self._args)))
    if self._prefetcher is None or not same or step != self._next:
      self.close()
      self._args = args
      self._prefetcher = Prefetcher(lambda s: self._make(s, *args), range(step, self._last + 1),
                                    self._depth)
    self._next = step + 1
    return self._prefetcher.next_for(step)

  def close(self):
    """Stops the producer (the next call starts a new one)."""
    if self._prefetcher is not None:
      self._prefetcher.close()
    self._prefetcher, self._args, self._next = None, None, None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
