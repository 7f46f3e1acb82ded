"""A few sharded training steps per layout, saved for comparison (run by the sharding tests).

  python tests/step_worker.py --out=DIR --layouts=ref,dp,fsdp,tp,fsdp_tp

Runs as a separate process because the number of (simulated) devices is fixed when jax
starts: the tests launch it with 8 CPU devices, or as 2 processes x 4 devices through
launch/local_multiprocess.sh. For each layout it sets up the train state through
`sharding.create_train_state`, as the trainer does, runs STEPS steps of the runlocal demo
config (warm-up off, so every step has a non-zero learning rate) from the same seed and
batches, and process 0 writes DIR/<layout>.npz (per step: loss, gradient norm and the largest
parameter change; at the end: every parameter and every leaf of the optimizer state, Adam's
moments included) and DIR/<layout>.json (the sharding the rules gave a few parameters and their
Adam moments, so the test can check they were applied; the layout's bytes per device and those
device 0 really holds; the setup's log lines).
"""

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import demo  # noqa: E402
from rerank.models import build
from rerank.training import distributed  # noqa: E402
from rerank.training import sharding  # noqa: E402
from rerank.training import steps  # noqa: E402
from rerank.data import batches  # noqa: E402
from rerank.data import datasets
from rerank.models import modes  # noqa: E402


def cache_env(tmp_path_factory) -> dict:
  """Environment for the test subprocesses' persistent compilation cache, in this pytest
  session's temporary folder; {} when the environment already names one (the subprocesses
  inherit it). The runs compile identical programs, and on a 2-core machine compiling is most
  of their time; entries are keyed by program and flags."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return {}
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


# layout -> (mesh, rules); "ref" runs on the first device alone.
LAYOUTS = {
    "ref": (dict(data=1, model=1), sharding.RULES["dp"]),
    "dp": (dict(data=-1, model=1), sharding.RULES["dp"]),
    "fsdp": (dict(data=-1, model=1), sharding.RULES["fsdp"]),
    "tp": (dict(data=-1, model=2), sharding.RULES["tp"]),
    "fsdp_tp": (dict(data=-1, model=2), dict(sharding.RULES["tp"], embed="data")),
}
# Parameters whose layout the test inspects (joint parameter tree, and Adam's moments).
WATCH = {
    "intermediate": ("params", "encoder", "layer_0", "intermediate", "kernel"),
    "query": ("params", "encoder", "layer_0", "attention", "query", "kernel"),
    "word_embeddings": ("params", "encoder", "embeddings", "word_embeddings", "embedding"),
}


# Steps compared: the first gives Adam's moments, later ones use them (bias correction, decay).
STEPS = 3


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def flat(tree, prefix: str) -> dict:
  """{"prefix/a/b/...": host array} of every leaf of a (replicated, local) tree."""
  def name(k):
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {"/".join([prefix] + [name(k) for k in path]): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_layout(name: str, config, model, tx, batches_, out_dir: str) -> None:
  """STEPS steps under layout `name`, set up by `sharding.create_train_state` as the trainer
  does."""
  mesh_cfg, rules = LAYOUTS[name]
  config = copy.deepcopy(config)
  config.mesh, config.rules = mesh_cfg, rules
  devices = jax.devices()[:1] if name == "ref" else jax.devices()
  lines = []
  state, layout = sharding.create_train_state(config, model, tx, devices=devices, log=lines.append)
  step = jax.jit(steps.make_train_step(model, config, tx),
                 in_shardings=(layout.state, layout.batch),
                 out_shardings=(layout.state, layout.replicated))
  per_step = {"loss": [], "grad_norm": [], "moved": []}  # moved: largest |parameter change|
  before = flat(sharding.local_replica(state["params"], layout.mesh), "params")
  for batch in batches_:
    state, metrics = step(state, sharding.shard_batch(batch, layout.batch))
    after = flat(sharding.local_replica(state["params"], layout.mesh), "params")
    per_step["moved"].append(max(float(np.abs(after[k] - before[k]).max()) for k in after))
    per_step["loss"].append(float(np.asarray(metrics["loss"])))
    per_step["grad_norm"].append(float(np.asarray(metrics["grad_norm"])))
    before = after
  watched = {}
  for key, path in WATCH.items():
    leaf = _get(state, path)
    adam = state["opt_state"]["main"][1][0]  # adamw's ScaleByAdamState
    mu, nu = _get(adam.mu, path[1:]), _get(adam.nu, path[1:])
    watched[key] = {"spec": list(leaf.sharding.spec), "shard": list(leaf.addressable_data(0).shape),
                    "mu_spec": list(mu.sharding.spec), "nu_spec": list(nu.sharding.spec)}
  # What one device really holds, to check the layout's computed figures against.
  held = {k: sum(x.addressable_data(0).nbytes for x in jax.tree_util.tree_leaves(state[k]))
          for k in ("params", "opt_state")}
  opt = flat(sharding.local_replica(state["opt_state"], layout.mesh), "opt")
  if distributed.is_main():
    arrays = {k: np.asarray(v) for k, v in per_step.items()}
    # `before` holds the last step's parameters by now.
    np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays, **before, **opt)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
      json.dump({"layout": watched, "mesh": dict(layout.mesh.shape), "loss": per_step["loss"],
                 "size": dataclasses.asdict(layout.size), "held": held, "log": lines,
                 "devices": jax.device_count(), "processes": jax.process_count()}, f)


def step_config():
  """The compared run's config."""
  # joint_sum exercises both objectives in one update; one layer keeps compiles short.
  config = demo.get_config("runlocal,mode=joint_sum")
  config.model.num_layers = 1
  # runlocal warms up for one step from a learning rate of 0: a first step that moves nothing.
  config.warmup_steps = 0
  return config


def build_step():
  """(config, model, optimizer, [STEPS batches]) of the compared steps."""
  config = step_config()
  tok = datasets.get_tokenizer(config)
  data, _ = datasets.load_split(config, "train", tok, config.dataset.num_train_images)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  tx = steps.optimizer(config)
  parts = modes.get(config.mode).batch_parts
  batches_ = [batches.train_batch(data, parts, config.batch_size, config.seed, s)
              for s in range(STEPS)]
  return config, model, tx, batches_


def assert_trained(out_dir: str, name: str = "ref") -> None:
  """Layout `name` trained: every step moved the parameters by about its learning rate.

  Adam's first update of a parameter with a gradient is lr * sign(gradient) (plus weight decay,
  5% of lr per unit of the parameter), later ones stay near lr; so the largest change of a step
  lies near that step's learning rate, here lr * (1 - s / total_steps) (no warm-up); seen:
  1.002-1.004 times it. A step with learning rate 0, a skipped step or a learning rate off by
  20% fails.
  """
  config = step_config()
  lr = [config.lr * (1 - s / config.total_steps) for s in range(STEPS)]
  moved = np.load(os.path.join(out_dir, f"{name}.npz"))["moved"]
  assert len(moved) == STEPS
  ratio = moved / np.asarray(lr)
  assert ((ratio > 0.9) & (ratio < 1.2)).all(), (moved, lr)


def _group(key: str) -> str:
  """Leaves compared on one scale: parameters, Adam's mu, Adam's nu, everything else."""
  for part in ("mu", "nu"):
    if f"/{part}/" in key:
      return part
  return key.split("/")[0]


def assert_same_leaves(a, b, name: str, rtol: float = 1e-5) -> None:
  """Every leaf of b (a mapping of `flat` names) equals a's, each on its group's scale.

  float32 sums in another order differ by a few ulps, so a leaf may differ by `rtol` of the
  largest magnitude in its group (parameters, mu, nu: nu ~ gradient^2 is ~1e-5 here, so a fixed
  atol would accept anything), elementwise by `rtol` of its own value. A per-leaf scale would
  not do: the attention key bias has no gradient (softmax ignores a shift shared by every key),
  its moments are float noise. Seen on 8 CPU devices: at most 1.3e-6 of the group's scale.
  """
  assert sorted(a) == sorted(b)
  scale = {}
  for key in a:
    scale[_group(key)] = max(scale.get(_group(key), 0.0), float(np.abs(a[key]).max()))
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=rtol * scale[_group(key)],
                               err_msg=f"{name}: {key}")


def assert_same_step(out_dir: str, name: str, ref: str = "ref", rtol: float = 1e-5) -> None:
  """Layout `name` computed what `ref` did: per-step losses, gradient norms and parameter
  changes, and after the last step every parameter and optimizer-state leaf (Adam's mu and nu),
  compared by `assert_same_leaves`."""
  a, b = np.load(os.path.join(out_dir, f"{ref}.npz")), np.load(os.path.join(out_dir, f"{name}.npz"))
  assert sum(k.startswith("params/") for k in a.files) > 10
  for part in ("mu", "nu"):
    assert sum(_group(k) == part for k in a.files) == sum(k.startswith("params/") for k in a.files)
  for key in ("loss", "grad_norm", "moved"):
    np.testing.assert_allclose(b[key], a[key], rtol=rtol, err_msg=f"{name}: {key}")
  assert_same_leaves({k: a[k] for k in a.files}, {k: b[k] for k in b.files}, name, rtol)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--layouts", default="ref,dp,fsdp,tp,fsdp_tp")
  args = parser.parse_args()
  distributed.initialize()
  built = build_step()
  os.makedirs(args.out, exist_ok=True)
  for name in args.layouts.split(","):
    t0 = time.perf_counter()
    run_layout(name, *built, args.out)
    distributed.log(f"{name}: {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
  main()
