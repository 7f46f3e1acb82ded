"""Training: loss goes down, checkpoints round-trip, the CLI writes its contract, resume is exact."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rerank.models import build

from rerank.training import checkpoints
from rerank.training import steps
from rerank.data import batches
from rerank.data import datasets
from rerank.models import modes

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
                        text=True, timeout=600)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert all("loss" in r for r in rows), rows  # every line carries step and loss
  assert len({r["step"] for r in rows}) == len(rows)  # one line per step, resumed or not
  return {r["step"]: r["loss"] for r in rows}


def test_cli_trains_evaluates_and_resumes_exactly(tmp_path):
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  cfg = "--config=configs/demo.py:runlocal"
  r = _run("rerank.train", cfg, f"--workdir={full}")
  assert r.returncode == 0, r.stderr[-3000:]
  # The results.json contract (DESIGN §4).
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
])
def test_bad_input_gives_one_actionable_line(tmp_path, args, expected):
  (tmp_path / "file").write_text("not a directory")
  r = _run(*[a.format(tmp=tmp_path) for a in args])
  assert r.returncode != 0
  lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error:"), r.stderr[-2000:]
  assert expected in lines[-1]
  assert "Traceback" not in r.stderr


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
