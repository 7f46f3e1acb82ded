"""Sharded evaluation: 1 process, 8 devices and 2 processes x 4 devices give the same recalls;
two processes each score half of the CE pairs; a SIGTERM during the final evaluation exits 0
and the rerun reuses the stored parts and writes the same results.json."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rerank.data import datasets
from rerank.indexing import indexes
from rerank.inference import engine
from rerank.inference import sharded
from rerank.models import build
from rerank.training import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402
import procs  # noqa: E402  (tests/, on the path as pytest runs this file)

LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")
# The runlocal demo, trained long enough that BE and RR rank far from chance; small stored
# parts (eval.part_pairs) so the final evaluation has a few dozen of them to resume from.
CONFIG_FILE = '''
from configs import demo

def get_config(arg=None):
  c = demo.get_config(arg)
  c.eval.part_pairs = 64
  return c
'''
ARGS = ["--config.total_steps=40", "--config.lr=2e-3", "--config.eval_every=0",
        "--config.log_every=10", "--config.checkpoint_every=40"]


def _env(**extra):
  # os.environ carries conftest.py's compilation cache: the runs compile alike programs.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one device unless `extra` says otherwise
  env.update(extra)
  return env


def _config_arg(tmp):
  path = os.path.join(tmp, "evalcfg.py")
  with open(path, "w") as f:
    f.write(CONFIG_FILE)
  return f"--config={path}:runlocal"


def _train_cmd(cfg, workdir):
  return [sys.executable, "-m", "rerank.train", cfg, *ARGS, f"--workdir={workdir}"]


def _evaluate_cmd(cfg, workdir, out):
  return [sys.executable, "-m", "rerank.evaluate", cfg, *ARGS, f"--workdir={workdir}",
          f"--out={out}"]


def _results(path):
  with open(os.path.join(path, "results.json")) as f:
    return json.load(f)


def _recalls(results):
  """What must not depend on the device count: every row's recalls and query counts."""
  return [{k: r[k] for k in ("model", "method", "k", "t2i", "i2t", "mR", "rsum", "queries")}
          for r in results["rows"]]


def _table(results) -> str:
  return (f"{results['processes']} process(es) x {results['devices']} device(s)\n"
          + "\n".join(f"  {r['method']}: t2i {r['t2i']} i2t {r['i2t']} pairs {r['pairs_scored']}"
                      for r in results["rows"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config argument, workdir): one runlocal training, evaluated on 1 process and 1 device."""
  tmp = str(tmp_path_factory.mktemp("trained"))
  cfg, workdir = _config_arg(tmp), os.path.join(tmp, "work")
  r = subprocess.run(_train_cmd(cfg, workdir), cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  results = _results(workdir)
  assert results["processes"] == 1 and results["devices"] == 1
  print(_table(results))
  return cfg, workdir


def test_eight_devices_and_two_processes_give_the_same_recalls(trained, tmp_path):
  cfg, workdir = trained
  one = _results(workdir)
  be = next(r for r in one["rows"] if r["method"] == "BE")
  assert be["rsum"] > 200, be  # trained: far above chance (about 85 for 32 images)

  out8 = str(tmp_path / "eight")
  r = subprocess.run(_evaluate_cmd(cfg, workdir, out8), cwd=REPO, capture_output=True, text=True,
                     env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  eight = _results(out8)
  assert (eight["processes"], eight["devices"]) == (1, 8)
  assert not os.path.exists(os.path.join(out8, "eval_parts"))  # removed once results are written

  out2 = str(tmp_path / "two")
  # In a process group killed at the end: the launcher's processes too, should it hang.
  r = procs.run_group([LAUNCH, "2", *_evaluate_cmd(cfg, workdir, out2)], timeout=480, cwd=REPO,
                      env=_env(RERANK_LOG_DIR=str(tmp_path)))
  other = tmp_path / "rerank_proc1.log"
  assert r.returncode == 0, r.stderr[-3000:] + (other.read_text()[-3000:] if other.exists() else "")
  two = _results(out2)
  assert (two["processes"], two["devices"]) == (2, 8)
  print(_table(eight), _table(two), sep="\n")

  assert _recalls(eight) == _recalls(one)
  assert _recalls(two) == _recalls(one)

  n, t = one["num_images"], one["num_texts"]
  for r1, r8, r2 in zip(one["rows"], eight["rows"], two["rows"]):
    q = r1["queries"]
    if r1["method"] == "BE":
      total, per_query = 0, 0
    elif r1["method"] == "CE":  # every query against the whole corpus
      total, per_query = q["t2i"] * n + q["i2t"] * t, max(n, t)
    else:  # RR: each query's top k
      total, per_query = (q["t2i"] + q["i2t"]) * r1["k"], r1["k"]
    assert r1["pairs_scored"] == [total] and r8["pairs_scored"] == [total]
    assert sum(r2["pairs_scored"]) == total
    # Half each, within one query's pairs (per direction).
    assert all(abs(c - total / 2) <= per_query for c in r2["pairs_scored"]), r2["pairs_scored"]
    if total:
      assert min(r2["pairs_scored"]) > 0


def test_sigterm_during_final_evaluation_then_rerun_gives_the_same_results(trained, tmp_path):
  cfg, trained_dir = trained
  workdir = str(tmp_path / "work")
  shutil.copytree(trained_dir, workdir)
  for name in ("results.json", "results.md"):
    os.remove(os.path.join(workdir, name))
  parts_dir = os.path.join(workdir, "eval_parts")

  # The same training command on a finished workdir only evaluates; stop it once parts exist.
  proc = subprocess.Popen(_train_cmd(cfg, workdir), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    t_end = time.time() + 400
    while not any(f.endswith(".npz") for _, _, fs in os.walk(parts_dir) for f in fs):
      assert proc.poll() is None, proc.communicate(timeout=60)[1][-3000:]
      assert time.time() < t_end, "no evaluation part stored after 400s"
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
  finally:
    proc.kill()
    proc.wait(timeout=60)
  assert proc.returncode == 0, err[-3000:]
  assert "(SIGTERM)" in out and "rerun the same command" in out, out[-2000:]
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  stored = sorted(f for _, _, fs in os.walk(parts_dir) for f in fs if f.endswith(".npz"))
  assert stored

  r = subprocess.run(_train_cmd(cfg, workdir), cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  reused = [line for line in r.stdout.splitlines() if line.startswith("reused stored part")]
  assert len(reused) == len(stored), (stored, reused)
  assert any("be_images" in line for line in reused)
  assert not os.path.exists(parts_dir)

  want, got = _results(trained_dir), _results(workdir)
  for rows in (want["rows"], got["rows"]):
    for row in rows:
      row.pop("seconds_per_query")  # wall time: the one field two runs may differ in
  assert got == want


def test_sharded_engine_on_one_device_equals_the_engine():
  config = demo.get_config("runlocal,mode=joint_alternate")
  tok = datasets.get_tokenizer(config)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  params = build.init_params(model, config, jax.random.PRNGKey(0))
  data, _ = datasets.load_split(config, "test", tok, 32)
  mesh = sharding.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
  plain = engine.DataScorer(engine.Engine(model, config.mode, 16, params))
  spread = engine.DataScorer(sharded.ShardedEngine(model, config.mode, 16, mesh, config.rules,
                                                   params))
  rows = np.arange(data.num_texts)
  np.testing.assert_array_equal(spread.texts(data, rows), plain.texts(data, rows))
  np.testing.assert_array_equal(spread.images(data, np.arange(32)), plain.images(data, np.arange(32)))
  texts, images = np.repeat(np.arange(5), 32), np.tile(np.arange(32), 5)
  got = spread.engine.score_pairs(*engine.text_rows(data, texts), *engine.image_rows(data, images),
                                  groups=5)
  np.testing.assert_array_equal(got, plain.pairs(data, texts, images))
  assert spread.engine.last_counts == [160]
  # The first stage over one shard: exactly the exact index's ranking.
  emb = plain.images(data, np.arange(32))
  queries = plain.texts(data, rows)
  np.testing.assert_array_equal(sharded.search(emb, queries, 10),
                                indexes.build(emb, "exact").search(queries, 10)[0])
