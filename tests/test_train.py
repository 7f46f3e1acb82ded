"""Training: loss goes down, checkpoints round-trip, the CLI writes its contract, resume is exact."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rerank import train
from rerank.data import batches
from rerank.data import datasets
from rerank.models import build
from rerank.models import modes
from rerank.training import checkpoints
from rerank.training import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402


def _config(mode="joint_alternate", **overrides):
  c = demo.get_config(f"runlocal,mode={mode}")
  c.update(overrides)
  return c


def _setup(config):
  tok = datasets.get_tokenizer(config)
  data, _ = datasets.load_split(config, "train", tok, config.dataset.num_train_images)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  tx = steps.optimizer(config)
  return data, model, tx, steps.init_train_state(model, config, tx, jax.random.PRNGKey(0))


@pytest.mark.parametrize("mode", ["joint_alternate", "joint_sum", "separate"])
def test_short_training_lowers_the_loss(mode):
  config = _config(mode, total_steps=40, lr=2e-3, warmup_steps=0, batch_size=16)
  data, model, tx, state = _setup(config)
  step_fn = jax.jit(steps.make_train_step(model, config, tx))
  # The same two batches over and over: the loss on them must fall.
  fixed = [batches.train_batch(data, modes.get(config.mode).batch_parts, config.batch_size, 0, s) for s in range(2)]
  losses = []
  for s in range(40):
    state, m = step_fn(state, fixed[s % 2])
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6]), losses
  assert int(state["step"]) == 40


def test_no_weight_decay_on_bias_and_layernorm():
  config = _config(weight_decay=0.5, lr=1e-2, warmup_steps=0, clip_norm=1e9)
  _, _, tx, state = _setup(config)
  params = state["params"]
  zero = jax.tree_util.tree_map(np.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)  # zero gradients: only decay acts
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  for path, u in flat:
    name = path[-1].key
    if name in ("bias", "scale"):
      assert not np.any(np.asarray(u)), name
  kernels = [np.asarray(u) for path, u in flat if path[-1].key == "kernel"]
  assert kernels and all(np.any(k) for k in kernels)


@pytest.mark.parametrize("mode,opt_keys", [
    ("be", ["main"]), ("ce", ["main"]), ("joint_sum", ["main"]), ("joint_alternate", ["be", "ce"]),
    ("separate", ["be", "ce"])])
def test_optimizer_state_keys_per_mode(mode, opt_keys):
  # Checkpoints store the optimizer state under these keys: they must not change.
  m = modes.get(mode)
  assert list(m.opt_keys) == opt_keys
  params = {"be": {"w": jnp.ones(2)}, "ce": {"w": jnp.ones(3)}} if m.separate else {"w": jnp.ones(2)}
  opt = steps.init_opt_state(steps.optimizer(_config(mode)), params, mode)
  assert list(opt) == opt_keys
  if m.separate:  # each tree has its own optimizer, shaped like it
    assert opt["ce"][1][0].mu["w"].shape == (3,)
  # Updates run BE first, then CE; a step with one update optimises every objective of its mode.
  assert [u.objectives for u in m.updates] == (
      [("be",), ("ce",)] if len(opt_keys) == 2 else [m.batch_parts])


def test_checkpoint_round_trip(tmp_path):
  config = _config()
  _, _, _, state = _setup(config)
  ckpts = checkpoints.Checkpoints(str(tmp_path), keep=2)
  ckpts.save(3, state)
  ckpts.save_best(3, state["params"], 12.5)
  ckpts.wait()
  restored = ckpts.restore_state(state)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         restored, state)
  params, which = ckpts.restore_params(state, prefer_best=True)
  assert which == "best (step 3)"
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         params, state["params"])
  ckpts.close()


def _run(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=480)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert all("loss" in r for r in rows), rows  # every line carries step and loss
  assert len({r["step"] for r in rows}) == len(rows)  # one line per step, resumed or not
  return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
  """train_and_evaluate called from Python on demo.py:runlocal: (config, workdir, results)."""
  workdir = str(tmp_path_factory.mktemp("in_process"))
  config = demo.get_config("runlocal")
  return config, workdir, train.train_and_evaluate(config, workdir)


def _recalls(results):
  return [[row[d][k] for d in ("t2i", "i2t") for k in ("R@1", "R@5", "R@10")]
          for row in results["rows"]]


def test_train_and_evaluate_in_process_writes_results(in_process):
  config, workdir, results = in_process
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))  # returned == written
  assert results["dataset"] == "synthetic_scenes" and results["split"] == "test"
  n_img, n_txt = config.dataset.num_test_images, results["num_texts"]
  assert results["num_images"] == n_img and n_txt == 5 * n_img
  assert [row["method"] for row in results["rows"]] == ["BE", "CE", "RR"]
  for row, recalls in zip(results["rows"], _recalls(results)):
    assert row["model"] == "joint"
    assert all(0 <= v <= 100 for v in recalls) and all(np.isfinite(recalls))
    assert row["mR"] == pytest.approx(np.mean(recalls)) and row["rsum"] > 0
  be, ce, rr = results["rows"]
  assert be["queries"] == rr["queries"] == {"t2i": n_txt, "i2t": n_img}  # rr_queries 0 = all
  assert ce["queries"] == {"t2i": config.eval.ce_queries_t2i, "i2t": config.eval.ce_queries_i2t}
  assert be["k"] is None and rr["k"] == config.eval.k
  assert results["checkpoint"].startswith("best (step ")  # eval.use_best with dev evaluation
  assert sorted(_losses(workdir)) == [2, 3, 4, 6]


def test_non_finite_loss_stops_training_before_it_is_saved(tmp_path, monkeypatch):
  make_train_step = steps.make_train_step

  def poisoned(model, config, tx):  # the BE loss turns NaN from step 4 on
    step_fn = make_train_step(model, config, tx)

    def fn(state, batch):
      new_state, m = step_fn(state, batch)
      bad = state["step"] >= 3
      return new_state, {**m, "be_loss": jnp.where(bad, jnp.nan, m["be_loss"]),
                         "loss": jnp.where(bad, jnp.nan, m["loss"])}
    return fn

  monkeypatch.setattr(steps, "make_train_step", poisoned)
  workdir = str(tmp_path / "w")
  # runlocal: 6 steps, a log line every 2, dev evaluation and a checkpoint every 3.
  with pytest.raises(steps.NonFiniteLossError) as e:
    train.train_and_evaluate(demo.get_config("runlocal"), workdir)
  message = str(e.value)
  assert message.startswith("loss is not finite at step 4 (finite at step 3, the previous check)")
  for name in ("be_loss=nan", " loss=nan", "ce_loss=", "be_grad_norm=", "ce_grad_norm="):
    assert name in message, message
  assert "\n" not in message
  def saved(d):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, d)) if n.isdigit())
  assert saved("checkpoints") == [3] and saved("best") == [3]  # nothing of step 4
  assert sorted(_losses(workdir)) == [2, 3]
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_cli_trains_evaluates_and_resumes_exactly(tmp_path, in_process, runlocal_run):
  # `python -m rerank.train --config=configs/demo.py:runlocal --workdir=full`, run once for the
  # tests that share it (conftest.py); copied, as the evaluation below rewrites results.json.
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  cfg = "--config=configs/demo.py:runlocal"
  shutil.copytree(runlocal_run[0], full)
  # The results.json contract (docs/DESIGN.md, section 3).
  with open(os.path.join(full, "results.json")) as f:
    res = json.load(f)
  assert res["dataset"] == "synthetic_scenes" and res["split"] == "test"
  assert res["num_images"] == 32 and res["num_texts"] == 160
  assert [row["method"] for row in res["rows"]] == ["BE", "CE", "RR"]
  for row in res["rows"]:
    assert row["model"] == "joint"
    assert set(row["t2i"]) == set(row["i2t"]) == {"R@1", "R@5", "R@10"}
    recalls = [row[d][k] for d in ("t2i", "i2t") for k in ("R@1", "R@5", "R@10")]
    assert all(0 <= v <= 100 for v in recalls)
    assert row["mR"] == pytest.approx(np.mean(recalls)) and row["rsum"] == pytest.approx(sum(recalls))
    assert row["seconds_per_query"] > 0
  assert res["rows"][1]["queries"] == {"t2i": 8, "i2t": 4}
  assert res["rows"][2]["k"] == 5
  assert os.path.exists(os.path.join(full, "results.md"))
  assert os.listdir(os.path.join(full, "tensorboard"))
  losses = _losses(full)
  assert sorted(losses) == [2, 3, 4, 6]  # log every 2, dev eval every 3
  # The command and the Python call are the same trainer: same losses, same table.
  np.testing.assert_array_equal([losses[s] for s in sorted(losses)],
                                [_losses(in_process[1])[s] for s in sorted(losses)])
  assert _recalls(res) == _recalls(in_process[2])

  # Stop after step 3 (a checkpoint), then rerun the same command: it resumes and matches.
  r = _run("rerank.train", cfg, f"--workdir={part}", "--stop_after=3")
  assert r.returncode == 0, r.stderr[-3000:]
  assert not os.path.exists(os.path.join(part, "results.json"))
  r = _run("rerank.train", cfg, f"--workdir={part}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed" in r.stdout
  resumed = _losses(part)
  assert sorted(resumed) == [2, 3, 4, 6]
  np.testing.assert_allclose([resumed[s] for s in (4, 6)], [losses[4], losses[6]], rtol=1e-6)

  # Re-evaluation of the trained workdir through the evaluate CLI.
  r = _run("rerank.evaluate", cfg, f"--workdir={full}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| joint | RR | 5 |" in r.stdout
  # --out keeps a re-evaluation (here with k=3) apart from the workdir's results.json.
  out = str(tmp_path / "k3")
  r = _run("rerank.evaluate", cfg, f"--workdir={full}", f"--out={out}", "--config.eval.k=3")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["rows"][2]["k"] == 3
  with open(os.path.join(full, "results.json")) as f:
    assert json.load(f)["rows"][2]["k"] == 5


@pytest.mark.parametrize("args,expected", [
    (["rerank.train", "--config=configs/demo.py:runlocal", "--workdir={tmp}/w",
      "--config.no_such_field=1"], "no_such_field"),
    (["rerank.train", "--config=configs/demo.py:runlocal", "--workdir={tmp}/file/w"], "workdir"),
    (["rerank.train", "--config=configs/demo.py:bogus", "--workdir={tmp}/w"], "bogus"),
    (["rerank.train", "--config=configs/nope.py", "--workdir={tmp}/w"], "configs/nope.py"),
    (["rerank.train", "--config=configs/demo.py", "--workdir={tmp}/w", "--config.lr=abc"], "lr"),
    (["rerank.evaluate", "--config=configs/demo.py:runlocal", "--workdir={tmp}/missing"], "missing"),
    (["rerank.evaluate", "--config=configs/demo.py:runlocal", "--workdir={tmp}"], "no checkpoint"),
    (["rerank.train", "--config=configs/demo.py:runlocal,mode=ce", "--workdir={tmp}/w",
      "--config.hard_negatives.every=2"], "bi-encoder"),
    (["rerank.train", "--config=configs/demo.py:runlocal", "--workdir={tmp}/w",
      "--config.log_every=0", "--config.eval.k=0"],
     "2 config problems: (1) config.log_every: expected an integer >= 1; found 0; "
     "(2) config.eval.k: expected an integer >= 1; found 0"),
    (["rerank.train", "--config=configs/demo.py:runlocal", "--workdir={tmp}/w",
      "--config.lr=1e30"], "loss is not finite at step 2"),
])
def test_bad_input_gives_one_actionable_line(tmp_path, args, expected):
  (tmp_path / "file").write_text("not a directory")
  r = _run(*[a.format(tmp=tmp_path) for a in args])
  assert r.returncode != 0
  lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error:"), r.stderr[-2000:]
  assert expected in lines[-1]
  assert "Traceback" not in r.stderr
  if "config problems" in expected:  # found before anything is written
    assert not os.path.exists(tmp_path / "w")


def test_cli_ance_mines_negatives_for_both_losses(tmp_path):
  # Mining every 3 steps through an exact index feeds the BE's sampled-triplet loss (2 negatives
  # per caption) and half of the CE's negatives.
  w = str(tmp_path / "ance")
  r = _run("rerank.train", "--config=configs/demo.py:runlocal", f"--workdir={w}",
           "--config.hard_negatives.every=3", "--config.hard_negatives.top=4",
           "--config.hard_negatives.be_negatives=2", "--config.hard_negatives.ce_prob=0.5",
           "--config.hard_negatives.index=exact", "--config.eval_every=0")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("mined 4 BE negatives") == 2, r.stdout  # steps 1 and 4
  with open(os.path.join(w, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows and all(row["be_mined_loss"] >= 0 for row in rows)
  assert all(np.isfinite(row["loss"]) for row in rows)
