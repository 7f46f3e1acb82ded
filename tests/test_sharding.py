"""Sharding: 3 training steps on 8 devices under dp / fsdp / tp equal the 1-device steps
(parameters and Adam moments); rules and mesh."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rerank.models import build

from rerank.training import sharding
from rerank.training import steps
from rerank.data import batches
from rerank.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
from configs import demo  # noqa: E402
from step_worker import (assert_same_leaves, assert_same_step, assert_trained,  # noqa: E402
                         cache_env, flat)

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("layouts"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", **cache_env(tmp_path_factory),
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "step_worker.py"),
                      f"--out={out}", "--layouts=ref,dp,fsdp,tp"], env=env, cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return out


@pytest.mark.parametrize("layout,mesh,specs", [
    # parameter -> expected PartitionSpec under the layout's rules (tiny model: embed 64, mlp 128)
    ("dp", {"data": 8, "model": 1}, {"intermediate": [None, None], "query": [None, None, None]}),
    ("fsdp", {"data": 8, "model": 1}, {"intermediate": ["data", None], "query": ["data", None, None],
                                       "word_embeddings": [None, "data"]}),
    ("tp", {"data": 4, "model": 2}, {"intermediate": [None, "model"], "query": [None, "model", None],
                                     "word_embeddings": [None, None]}),
])
def test_steps_on_8_devices_equal_1_device(eight_devices, layout, mesh, specs):
  with open(os.path.join(eight_devices, f"{layout}.json")) as f:
    info = json.load(f)
  assert info["devices"] == 8 and info["mesh"] == mesh
  for name, spec in specs.items():
    got = info["layout"][name]
    assert got["spec"] == spec, (name, got)
    assert got["mu_spec"] == spec, (name, got)  # Adam's moments follow their parameter
    assert got["nu_spec"] == spec, (name, got)
  # The layout line's figures are what a device really holds; fsdp splits most of it 8 ways.
  size = info["size"]
  assert size["params_per_device"] == info["held"]["params"]
  assert size["opt_per_device"] == info["held"]["opt_state"]
  share = size["params_per_device"] / size["params_total"]
  assert {"dp": share == 1, "fsdp": 1 / 8 <= share < 0.2, "tp": 0.5 < share < 1}[layout], share
  assert len(info["log"]) == 1, info["log"]  # the presets fit the tiny model: nothing falls back
  assert info["log"][0].startswith("layout: params ") and info["log"][0].endswith(f"rules {layout}")
  assert_trained(eight_devices)  # the reference moved: equal parameters are not initial ones
  assert_same_step(eight_devices, layout)


def test_mesh_from_config():
  devs = [object()] * 8  # make_mesh only lays devices out
  assert dict(sharding.make_mesh({"model": 2, "data": -1}, devs).shape) == {"data": 4, "model": 2}
  assert sharding.make_mesh({"model": 2, "data": -1}, devs).axis_names == ("data", "model")
  assert dict(sharding.make_mesh({"data": 8}, devs).shape) == {"data": 8}
  for bad, msg in [({"data": 3}, "multiply to the 8 devices"),
                   ({"data": -1, "model": 3}, r"product \(3\) divides the 8 devices"),
                   ({"data": -1, "model": -1}, "at most one -1")]:
    with pytest.raises(ValueError, match=msg):
      sharding.make_mesh(bad, devs)


def test_rules_fall_back_to_replication():
  mesh = sharding.make_mesh({"data": 4, "model": 2}, [object()] * 8)
  rules = sharding.ordered_rules(dict(sharding.RULES["tp"], embed="data", mlp="data"))
  # embed takes "data" first, so mlp (also "data") stays whole; an odd vocab is not split.
  spec, why = sharding.mesh_axes(("embed", "mlp"), (64, 128), rules, mesh)
  assert spec == sharding.P("data", None)
  assert why == ["dim 1 ('mlp', size 128) stays replicated: mesh axis 'data' already shards "
                 "dim 0 ('embed')"]
  spec, why = sharding.mesh_axes(("vocab", "embed"), (47, 64), rules + (("vocab", "model"),), mesh)
  assert spec == sharding.P(None, "data")
  assert why == ["dim 0 ('vocab', size 47) stays replicated: 47 is not a multiple of mesh axis "
                 "'model' (2)"]
  spec, why = sharding.mesh_axes((None, "heads", "kv"), (8, 2, 32), rules, mesh)
  assert spec == sharding.P(None, "model", None) and why == []


def test_rules_are_checked():
  mesh = sharding.make_mesh({"data": 8}, [object()] * 8)
  config = demo.get_config("runlocal")
  config.rules.mlp = "model"
  with pytest.raises(ValueError, match="config.rules.mlp"):
    sharding.rules_from_config(config, mesh)
  with pytest.raises(ValueError, match="sharding"):
    demo.get_config("sharding=zero3")


def _ce_setup(**model_overrides):
  config = demo.get_config("runlocal,mode=ce")
  config.model.num_layers = 1
  config.model.update(model_overrides)
  tok = datasets.get_tokenizer(config)
  data, _ = datasets.load_split(config, "train", tok, config.dataset.num_train_images)
  batch = batches.train_batch(data, ("ce",), config.batch_size, 0, 0)
  return config, tok, batch


def _step(config, tok, batch, state):
  """(state, metrics) after one jitted step of `config` from `state`."""
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  tx = steps.optimizer(config)
  return jax.jit(steps.make_train_step(model, config, tx))(state, batch)


def test_gradient_accumulation_and_remat_match_the_plain_step():
  # CE loss is a mean over pairs, so 2 micro-batches of B/2 pairs give the full-batch gradient
  # (dropout off: micro-batches draw their own dropout masks). Remat recomputes, same numbers.
  config, tok, batch = _ce_setup(dropout_rate=0.0, attention_dropout_rate=0.0, head_dropout=0.0)
  config.warmup_steps = 0  # runlocal's warm-up step has learning rate 0: nothing would move
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  # One initial state for all three (remat names no parameter differently), made by a jitted
  # init: initialising op by op costs seconds per call on a CPU.
  state = jax.jit(lambda: steps.init_train_state(model, config, steps.optimizer(config),
                                                 jax.random.PRNGKey(0)))()
  s1, m1 = _step(config, tok, batch, state)
  config.grad_accum = 2
  s2, m2 = _step(config, tok, batch, state)
  config.grad_accum = 1
  config.model.remat = True
  s3, m3 = _step(config, tok, batch, state)
  leaves = lambda s: {**flat(s["params"], "params"), **flat(s["opt_state"], "opt")}  # noqa: E731
  moved = max(np.abs(b - a).max() for a, b in zip(jax.tree_util.tree_leaves(state["params"]),
                                                  jax.tree_util.tree_leaves(s1["params"])))
  assert 0.9 * config.lr < moved < 1.2 * config.lr  # Adam's first step: lr * sign(gradient)
  for name, s, m in (("grad_accum", s2, m2), ("remat", s3, m3)):
    np.testing.assert_allclose(m["loss"], m1["loss"], **TOL)
    np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], **TOL)
    assert_same_leaves(leaves(s1), leaves(s), name)
  # The split keeps each positive with its negative: micro-batch i = rows i of both halves.
  micro = steps._microbatches({"ce": {"labels": np.arange(8)}}, 2)["ce"]["labels"]
  np.testing.assert_array_equal(micro, [[0, 1, 4, 5], [2, 3, 6, 7]])
