r"""Training throughput benchmark: pairs/s and model-FLOPs utilisation (MFU) on the present devices.

  python -m rerank.bench_train [--quick] [--sizes=tiny,base] [--out=bench.json]

Measures, in one run: the device's dense matmul peak (an N x N x N product in the compute
dtype, the best of several timed repetitions), then for each encoder size the time of one
training step of the joint model (`joint_alternate`: a bi-encoder update on B caption/image
pairs, then a cross-encoder update on B positive + B negative pairs) on random inputs of the
paper's shapes (batch 128, 72 text tokens, 50 regions). MFU = model matmul FLOPs per second /
measured peak; the model FLOPs count the Transformer's matmuls analytically (3x the forward
pass for forward + backward, attention included, elementwise work and rematerialisation not
counted), the usual definition. Data parallel over every local device; bf16 compute with
float32 master weights on GPU/TPU, float32 on CPU. `--quick` shrinks the shapes so the run
takes a minute on a laptop CPU (figures then only show the script works).

Needs nothing but the package's own modules and jax/flax/optax; no data or checkpoints.
"""

import argparse
import json
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from rerank.training import sharding
from rerank.training import steps
from rerank.models import encoder as encoder_lib
from rerank.models import heads

# (hidden, layers, heads, mlp), as config_utils.SIZES (a test keeps them equal); repeated here
# so the benchmark imports no config machinery.
SIZES = {"tiny": (64, 2, 2, 128), "mini": (128, 2, 4, 512), "small": (256, 4, 4, 1024),
         "base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}
VOCAB = 30522  # BERT-base uncased, as OSCAR
FEATURES, BOX = 2048, 6


def measure_peak(dtype, n: int, reps: int = 5, chain: int = 10) -> float:
  """Best TFLOP/s of `chain` dependent n x n x n matmuls in `dtype`, over `reps` timed calls."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = (jax.random.normal(k2, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)  # keeps norms ~1

  @jax.jit
  def run(a, b):
    return jax.lax.fori_loop(0, chain, lambda _, x: x @ b, a)

  run(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    run(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 * chain / best / 1e12


def forward_flops(n: int, seq: int, hidden: int, layers: int, mlp: int, regions: int = 0) -> float:
  """Matmul FLOPs of one encoder forward over n sequences of length seq (regions of them images)."""
  per_layer = 2 * n * seq * (4 * hidden * hidden + 2 * hidden * mlp) + 4 * n * seq * seq * hidden
  region_proj = 2 * n * regions * (FEATURES + BOX) * hidden
  pooler = 2 * n * hidden * hidden
  return layers * per_layer + region_proj + pooler


def step_flops(batch: int, text_len: int, regions: int, hidden: int, layers: int, mlp: int) -> float:
  """Model FLOPs of one joint_alternate step (BE text + BE image + CE pairs, fwd + bwd)."""
  fwd = (forward_flops(batch, text_len, hidden, layers, mlp)
         + forward_flops(batch, 1 + regions, hidden, layers, mlp, regions)
         + forward_flops(2 * batch, text_len + regions, hidden, layers, mlp, regions))
  return 3 * fwd


def _config(size: str, batch: int, text_len: int, regions: int, dtype: str, remat: bool):
  hidden, layers, heads, mlp = SIZES[size]
  model_cfg = encoder_lib.EncoderConfig(
      vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_dim=mlp,
      feature_dim=FEATURES, box_dim=BOX, dtype=dtype, remat=remat)
  # The fields of the demo config that steps.py reads, with the paper's optimiser settings.
  config = types.SimpleNamespace(
      mode="joint_alternate", seed=0, batch_size=batch, max_text_len=text_len,
      max_regions=regions, lr=5e-5, total_steps=30_000, warmup_steps=0, weight_decay=0.05,
      adam_eps=1e-6, clip_norm=1.0, grad_accum=1,
      loss=types.SimpleNamespace(be="vsepp", margin=0.1, temperature=0.05, ce_weight=1.0),
      model=types.SimpleNamespace(feature_dim=FEATURES, box_dim=BOX))
  return config, model_cfg


def _random_batch(batch: int, text_len: int, regions: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  def side(n):
    return {"token_ids": rng.integers(1, VOCAB, (n, text_len), dtype=np.int32),
            "text_mask": np.ones((n, text_len), bool),
            "regions": rng.standard_normal((n, regions, FEATURES + BOX), dtype=np.float32),
            "region_mask": np.ones((n, regions), bool)}
  return {"be": {**side(batch), "image_ids": np.arange(batch, dtype=np.int64)},
          "ce": {**side(2 * batch),
                 "labels": np.concatenate([np.ones(batch, np.int32), np.zeros(batch, np.int32)])}}


def bench_size(size: str, batch: int, text_len: int, regions: int, dtype: str, warmup: int,
               iters: int, remat: bool = False) -> dict:
  """Times `iters` training steps of `size` after `warmup` (compile included there)."""
  config, model_cfg = _config(size, batch, text_len, regions, dtype, remat)
  model = heads.RetrievalModel(model_cfg, cls_token_id=1)
  tx = steps.optimizer(config)
  mesh = sharding.make_mesh({"data": -1}, jax.local_devices())
  rules = sharding.RULES["dp"]
  make_state = lambda: steps.init_train_state(model, config, tx, jax.random.PRNGKey(0))  # noqa: E731
  state_sh = sharding.state_shardings(jax.eval_shape(make_state),
                                      sharding.logical_param_axes(model, config), rules, mesh)
  batch_sh = sharding.batch_sharding(mesh, rules)
  state = jax.jit(make_state, out_shardings=state_sh)()
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  step = jax.jit(steps.make_train_step(model, config, tx), donate_argnums=(0,),
                 in_shardings=(state_sh, batch_sh))
  data = sharding.shard_batch(_random_batch(batch, text_len, regions), batch_sh)
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(iters):
    state, metrics = step(state, data)
  loss = float(jax.block_until_ready(metrics)["loss"])
  step_s = (time.perf_counter() - t0) / iters
  if not np.isfinite(loss):
    raise FloatingPointError(f"{size}: non-finite loss {loss}")
  hidden, layers, _, mlp = SIZES[size]
  flops = step_flops(batch, text_len, regions, hidden, layers, mlp)
  return {"size": size, "params_m": n_params / 1e6, "batch": batch, "text_len": text_len,
          "regions": regions, "step_ms": step_s * 1e3, "pairs_per_step": 3 * batch,
          "pairs_per_s": 3 * batch / step_s, "model_tflop_per_step": flops / 1e12,
          "model_tflops": flops / step_s / 1e12, "warmup_s": compile_s, "iters": iters}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="small shapes and few steps (a CPU smoke run)")
  p.add_argument("--sizes", default="tiny,base", help="comma-separated encoder sizes")
  p.add_argument("--batch", type=int, default=0, help="captions per step (0 = 128, quick: 8)")
  p.add_argument("--iters", type=int, default=0, help="timed steps (0 = 20, quick: 2)")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer in the backward pass")
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  bad = [s for s in sizes if s not in SIZES]
  if bad:
    print(f"error: --sizes: unknown {bad}; expected some of {sorted(SIZES)}", file=sys.stderr)
    return 2

  dev = jax.local_devices()[0]
  accel = dev.platform in ("gpu", "tpu", "cuda", "rocm")
  dtype = "bfloat16" if accel else "float32"
  batch = args.batch or (8 if args.quick else 128)
  text_len, regions = (16, 8) if args.quick else (72, 50)
  iters = args.iters or (2 if args.quick else 20)
  n = 512 if args.quick else (8192 if accel else 2048)
  devices = jax.local_device_count()
  if batch % devices:
    print(f"error: --batch {batch} must be a multiple of the {devices} local devices", file=sys.stderr)
    return 2

  peak = measure_peak(jnp.dtype(dtype), n) * devices
  print(f"device: {dev.device_kind} ({dev.platform}) x {devices}; compute {dtype}; "
        f"measured matmul peak {peak:.4g} TFLOP/s ({n}^3 {dtype} products, all devices)", flush=True)
  rows = []
  for size in sizes:
    row = bench_size(size, batch, text_len, regions, dtype, warmup=2, iters=iters, remat=args.remat)
    row["mfu"] = row["model_tflops"] / peak
    rows.append(row)
    print(f"  {size}: {row['step_ms']:.1f} ms/step, {row['pairs_per_s']:.0f} pairs/s, "
          f"MFU {100 * row['mfu']:.1f}%", flush=True)

  print(f"\njoint_alternate training step, batch {batch} captions ({3 * batch} pairs: {batch} BE + "
        f"{2 * batch} CE), text {text_len}, regions {regions}, {dtype}{', remat' if args.remat else ''}")
  print("| size | params (M) | ms/step | pairs/s | model GFLOP/step | model TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['size']} | {r['params_m']:.1f} | {r['step_ms']:.1f} | {r['pairs_per_s']:.0f} | "
          f"{1e3 * r['model_tflop_per_step']:.1f} | {r['model_tflops']:.4g} | {100 * r['mfu']:.1f}% |")
  if args.out:
    result = {"device": dev.device_kind, "platform": dev.platform, "devices": devices,
              "dtype": dtype, "peak_tflops": peak, "peak_matmul_n": n, "quick": args.quick,
              "remat": args.remat, "jax": jax.__version__, "rows": rows}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
