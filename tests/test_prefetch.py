"""Prefetching input: the same batches as the synchronous path, across a resume and a change of
mined negatives; producer errors reach the trainer; the thread always stops."""

import os
import sys
import threading
import time

import numpy as np
import pytest

from rerank import train
from rerank.data import batches
from rerank.data import prefetch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402
from test_batches import _data  # noqa: E402  (the same tiny RetrievalData)


def _materialise(tree):
  return {k: _materialise(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], dict):
      _assert_same(a[key], b[key])
    else:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _make(data):
  def make(step, mined):  # as the trainer's make_batch, without the device transfer
    return _materialise(batches.train_batch(data, ("be", "ce"), 6, 5, step - 1, mined, 0.5,
                                            num_be_negatives=2, lazy=True))
  return make


def test_feed_yields_the_synchronous_batches_across_mining_and_a_resume():
  data = _data(num_images=20)
  make = _make(data)
  mined_a = None
  mined_b = {r: np.array([(r // 3 + 7) % 20]) for r in range(data.num_texts)}  # new at step 6
  mined_at = lambda step: mined_a if step < 6 else mined_b  # noqa: E731
  want = {s: make(s, mined_at(s)) for s in range(1, 16)}

  with prefetch.Feed(make, 15, depth=3) as feed:  # an uninterrupted run
    for s in range(1, 16):
      _assert_same(feed(s, mined_at(s)), want[s])
  with prefetch.Feed(make, 15, depth=3) as feed:  # a run resumed at step 9 (after step 8)
    for s in range(9, 16):
      _assert_same(feed(s, mined_b), want[s])
  with prefetch.Feed(make, 15, depth=0) as feed:  # depth 0: synchronous, same batches
    _assert_same(feed(4, None), want[4])
  assert not np.array_equal(want[6]["be"]["neg_regions"], make(6, None)["be"]["neg_regions"])


def test_prefetcher_runs_ahead_by_depth_and_stops_at_the_end():
  made = []
  p = prefetch.Prefetcher(lambda s: made.append(s) or s * 10, range(3, 9), depth=2)
  assert p.next_for(3) == 30
  deadline = time.time() + 5
  while len(made) < 4 and time.time() < deadline:  # 3 consumed + 2 queued, 1 more blocked
    time.sleep(0.01)
  assert made[:3] == [3, 4, 5] and len(made) <= 4
  assert [b for _, b in p] == [40, 50, 60, 70, 80]
  p._thread.join(5)
  assert not p.alive
  with pytest.raises(StopIteration):
    next(p)


def test_producer_error_reaches_the_consumer_and_the_thread_stops():
  def make(step):
    if step == 3:
      raise ValueError("CE batches need at least two distinct images")
    return step

  p = prefetch.Prefetcher(make, range(1, 100), depth=2)
  assert p.next_for(1) == 1 and p.next_for(2) == 2
  with pytest.raises(ValueError, match="two distinct images"):
    p.next_for(3)
  assert not p.alive


def test_close_with_a_full_queue_does_not_hang():
  p = prefetch.Prefetcher(lambda s: s, range(10**9), depth=2)
  p.next_for(0)
  p.close()
  assert not p.alive
  with pytest.raises(StopIteration):
    next(p)
  with pytest.raises(ValueError, match="depth"):
    prefetch.Prefetcher(lambda s: s, range(3), depth=0)


def test_out_of_order_step_is_an_error_not_a_wrong_batch():
  p = prefetch.Prefetcher(lambda s: s, range(5), depth=1)
  with pytest.raises(RuntimeError, match="step 2"):
    p.next_for(2)
  assert not p.alive


def test_trainer_raises_the_producers_error_and_leaves_no_thread(tmp_path, monkeypatch):
  real = batches.train_batch

  def failing(data, parts, batch_size, seed, step, *args, **kwargs):
    if step == 0:  # the first batch (a later one would only add compile time to the test)
      raise OSError("region file vanished")
    return real(data, parts, batch_size, seed, step, *args, **kwargs)

  monkeypatch.setattr(batches, "train_batch", failing)
  with pytest.raises(OSError, match="region file vanished"):
    train.train_and_evaluate(demo.get_config("runlocal"), str(tmp_path / "w"))
  assert not [t for t in threading.enumerate() if t.name == "rerank-prefetch"]
