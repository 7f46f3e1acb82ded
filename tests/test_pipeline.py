"""Input pipeline: deterministic from the seed, exact resume, disjoint per-host shards."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from rerank.data import batches
from rerank.data import datasets
from rerank.data import pipeline
from rerank.data import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake(num_images=10, per_image=3):
  caption_image = np.repeat(np.arange(num_images), per_image).astype(np.int32)
  t = len(caption_image)

  def region_features(rows):
    rows = np.asarray(rows)
    return (np.zeros((len(rows), 2, 3), np.float32) + rows[:, None, None],
            np.ones((len(rows), 2), bool))

  return batches.RetrievalData(
      token_ids=np.arange(t, dtype=np.int32)[:, None].repeat(4, 1), text_mask=np.ones((t, 4), bool),
      caption_image=caption_image, image_ids=np.arange(num_images, dtype=np.int64) + 50,
      region_features=region_features)


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].keys() == b[k].keys()
    for f in a[k]:
      np.testing.assert_array_equal(a[k][f], b[k][f], err_msg=f"{k}/{f}")


@pytest.fixture(scope="module")
def prepared_synthetic(tmp_path_factory):
  """A prepared synthetic_scenes train split read back through load_split (the real path)."""
  data_dir = tmp_path_factory.mktemp("data")
  prepare.prepare("synthetic_scenes", "", str(data_dir), dtype="float16", splits=["train"],
                  num_images=24)
  cfg = ml_collections.ConfigDict(dict(
      dataset=dict(name="synthetic_scenes", data_dir=str(data_dir)), max_regions=3,
      max_text_len=16))
  data, _ = datasets.load_split(cfg, "train", datasets.get_tokenizer(cfg))
  return data


def test_one_host_equals_the_trainers_batches_and_truncates(prepared_synthetic):
  data = prepared_synthetic
  it = pipeline.HostIterator(data, "joint_alternate", 16, seed=3, host=pipeline.Host(0, 1))
  for step in range(3):
    got = next(it)
    _assert_same(got, batches.train_batch(data, "joint_alternate", 16, 3, step))
  assert got["be"]["regions"].shape == (16, 3, 2054)  # config.max_regions
  assert got["be"]["token_ids"].shape == (16, 16)  # config.max_text_len
  assert got["ce"]["regions"].shape == (32, 3, 2054)
  it.close()


def test_same_seed_same_batches_other_seed_other_batches():
  data = _fake()
  a = pipeline.HostIterator(data, "joint_alternate", 6, seed=1, host=pipeline.Host(0, 1))
  b = pipeline.HostIterator(data, "joint_alternate", 6, seed=1, host=pipeline.Host(0, 1),
                            prefetch=0)
  c = pipeline.HostIterator(data, "joint_alternate", 6, seed=2, host=pipeline.Host(0, 1))
  xs, ys, zs = ([next(i) for _ in range(8)] for i in (a, b, c))
  for x, y in zip(xs, ys):
    _assert_same(x, y)
  assert not all(np.array_equal(x["be"]["token_ids"], z["be"]["token_ids"]) for x, z in zip(xs, zs))
  for i in (a, b, c):
    i.close()


@pytest.mark.parametrize("hosts", [1, 2])
def test_resume_mid_epoch_continues_with_exactly_the_next_batch(hosts):
  data = _fake()  # 30 captions, batch 4: an epoch ends inside step 7
  for p in range(hosts):
    host = pipeline.Host(p, hosts)
    full = pipeline.HostIterator(data, "joint_alternate", 4, seed=9, host=host)
    run = [next(full) for _ in range(12)]
    first = pipeline.HostIterator(data, "joint_alternate", 4, seed=9, host=host)
    for _ in range(5):
      next(first)
    state = json.loads(json.dumps(first.get_state()))  # as stored with a checkpoint
    first.close()
    resumed = pipeline.HostIterator(data, "joint_alternate", 4, seed=9, host=host, prefetch=0)
    resumed.set_state(state)
    for step in range(5, 12):
      _assert_same(next(resumed), run[step])
    full.close()
  other = pipeline.HostIterator(_fake(num_images=11), "be", 4, seed=9, host=pipeline.Host(0, 1))
  with pytest.raises(ValueError, match="num_texts=30 but this run has 33"):
    other.set_state(state)


def test_two_hosts_read_disjoint_halves_of_the_global_batch():
  data = _fake()
  glob = [batches.caption_rows(data.num_texts, 6, 4, s) for s in range(10)]  # 2 epochs
  for step in range(10):
    parts = [pipeline.host_rows(data.num_texts, 6, 4, step, pipeline.Host(p, 2)) for p in range(2)]
    assert not set(parts[0]) & set(parts[1])
    np.testing.assert_array_equal(np.concatenate(parts), glob[step])
    be = pipeline.host_batch(data, "be", 6, 4, step, pipeline.Host(1, 2))["be"]
    np.testing.assert_array_equal(be["token_ids"][:, 0], parts[1])  # token row == caption row
  epoch = np.concatenate(glob)[:data.num_texts]
  assert sorted(epoch.tolist()) == list(range(data.num_texts))  # the union is the whole split
  with pytest.raises(ValueError, match="must split evenly over 4 hosts"):
    pipeline.host_rows(30, 6, 0, 0, pipeline.Host(0, 4))


_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from rerank.data import pipeline
    host = pipeline.Host.current()
    from tests.test_pipeline import _fake
    it = pipeline.HostIterator(_fake(), "be", 8, seed=5, host=host)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rows, shapes = [], []
    for _ in range(6):
      b = next(it)["be"]
      rows.append(b["token_ids"][:, 0].tolist())
      g = pipeline.to_global({"ids": b["token_ids"]}, NamedSharding(mesh, P("data")))["ids"]
      local = np.concatenate([np.asarray(s.data) for s in g.addressable_shards])
      assert (local == b["token_ids"]).all()
      shapes.append(list(g.shape))
    it.close()
    print(json.dumps({"index": host.index, "count": host.count, "rows": rows, "shapes": shapes}))
    jax.distributed.shutdown()
""")


def test_two_real_processes_shard_by_process_index(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(i)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  res = sorted((json.loads(o.strip().splitlines()[-1]) for o, _ in outs), key=lambda r: r["index"])
  assert [(r["index"], r["count"]) for r in res] == [(0, 2), (1, 2)]
  for step in range(6):
    a, b = res[0]["rows"][step], res[1]["rows"][step]
    assert not set(a) & set(b)
    np.testing.assert_array_equal(a + b, batches.caption_rows(30, 8, 5, step))
    assert res[0]["shapes"][step] == [8, 4]  # one global batch over 4 devices in 2 processes
