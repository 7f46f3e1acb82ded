"""One sharded training step per layout, saved for comparison (run by the sharding tests).

  python tests/step_worker.py --out=DIR --layouts=ref,dp,fsdp,tp,fsdp_tp

Runs as a separate process because the number of (simulated) devices is fixed when jax
starts: the tests launch it with 8 CPU devices, or as 2 processes x 4 devices through
launch/local_multiprocess.sh. For each layout it sets up the train state through
`sharding.create_train_state`, as the trainer does, runs one step of the runlocal demo config
from the same seed and batch, and process 0 writes DIR/<layout>.npz (loss and every updated
parameter) and DIR/<layout>.json (the sharding the rules gave a few parameters and their Adam
moments, so the test can check they were applied; the layout's bytes per device and those
device 0 really holds; the setup's log lines).
"""

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
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

# Subprocesses share a persistent compilation cache: the runs compile identical programs, and on
# this 2-core machine compiling is most of their time. Entries are keyed by program and flags.
JAX_CACHE = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "rerank_test_jax_cache"),
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


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def run_layout(name: str, config, model, tx, batch, out_dir: str) -> None:
  """One step under layout `name`, set up by `sharding.create_train_state` as the trainer does."""
  mesh_cfg, rules = LAYOUTS[name]
  config = copy.deepcopy(config)
  config.mesh, config.rules = mesh_cfg, rules
  devices = jax.devices()[:1] if name == "ref" else jax.devices()
  lines = []
  state, layout = sharding.create_train_state(config, model, tx, devices=devices, log=lines.append)
  step = jax.jit(steps.make_train_step(model, config, tx),
                 in_shardings=(layout.state, layout.batch),
                 out_shardings=(layout.state, layout.replicated))
  state, metrics = step(state, sharding.shard_batch(batch, layout.batch))
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
  params = sharding.local_replica(state["params"], layout.mesh)
  loss = float(np.asarray(metrics["loss"]))
  if distributed.is_main():
    flat = {"/".join(str(k.key) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(out_dir, f"{name}.npz"), loss=loss, **flat)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
      json.dump({"layout": watched, "mesh": dict(layout.mesh.shape), "loss": loss,
                 "size": dataclasses.asdict(layout.size), "held": held, "log": lines,
                 "devices": jax.device_count(), "processes": jax.process_count()}, f)


def build_step():
  """(config, model, optimizer, batch) of the compared step."""
  # joint_sum exercises both objectives in one update; one layer keeps compiles short.
  config = demo.get_config("runlocal,mode=joint_sum")
  config.model.num_layers = 1
  tok = datasets.get_tokenizer(config)
  data, _ = datasets.load_split(config, "train", tok, config.dataset.num_train_images)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  tx = steps.optimizer(config)
  batch = batches.train_batch(data, modes.get(config.mode).batch_parts, config.batch_size, config.seed, 0)
  return config, model, tx, batch


def assert_same_step(out_dir: str, name: str, ref: str = "ref", tol: float = 1e-5) -> None:
  """Loss and every updated parameter of layout `name` equal those of `ref` (float32, to tol)."""
  a, b = np.load(os.path.join(out_dir, f"{ref}.npz")), np.load(os.path.join(out_dir, f"{name}.npz"))
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
  np.testing.assert_allclose(b["loss"], a["loss"], rtol=tol, atol=tol)
  for key in a.files:
    np.testing.assert_allclose(b[key], a[key], rtol=tol, atol=tol, err_msg=f"{name}: {key}")


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
