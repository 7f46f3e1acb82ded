r"""Training throughput benchmark: pairs/s and model-FLOPs utilisation (MFU) on the present devices.

  python -m rerank.bench_train [--quick] [--sizes=tiny,base] [--noinput] [--out=bench.json]

Measures, in one run: the device's dense matmul peak (an N x N x N product in the compute
dtype, the best of several timed repetitions), then for each encoder size the time of one
training step of the joint model (`joint_alternate`: a bi-encoder update on B caption/image
pairs, then a cross-encoder update on B positive + B negative pairs) on random inputs of the
paper's shapes (batch 128, 72 text tokens, 50 regions). MFU = model matmul FLOPs per second /
measured peak; the model FLOPs count the Transformer's matmuls analytically (3x the forward
pass for forward + backward, attention included, elementwise work and rematerialisation not
counted), the usual definition. Data parallel over every local device (set up by
`sharding.create_train_state`, as the trainer); bf16 compute with
float32 master weights on GPU/TPU, float32 on CPU. `--quick` shrinks the shapes so the run
takes a minute on a laptop CPU (figures then only show the script works).

Input (unless --noinput): the trainer's input at the same shapes, timed next to the step. A
synthetic Flickr30k-format release (`rerank.data.benchmark.write_release`: 10-100 regions of
2048 features per image, 5 captions) is prepared into a temporary directory and read as the
trainer reads it: `input ms/batch` is one batch made the trainer's way, synchronously
(`train_batch(lazy=True)`: rows and negatives, then `shard_batch`: region reads and the copy
to the devices); `fed ms/step` is a training step fed by the trainer's prefetching input
(`rerank.data.prefetch`, one producer thread per host). Training is input-bound when input
ms/batch exceeds ms/step; fed ms/step then follows the input, not the model.

Needs nothing but the package's own modules and jax/flax/optax; no data or checkpoints.
"""

import functools
import json
import os
import shutil
import tempfile
import time

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rerank import cli
from rerank.data import batches
from rerank.data import benchmark as data_benchmark
from rerank.data import datasets
from rerank.data import prefetch
from rerank.data import prepare
from rerank.data import tfds_builders
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

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_bool("quick", False, "small shapes and few steps (a CPU smoke run)")
  flags.DEFINE_string("sizes", "tiny,base", "comma-separated encoder sizes")
  flags.DEFINE_integer("batch", 0, "captions per step (0 = 128, quick: 8)")
  flags.DEFINE_integer("iters", 0, "timed steps (0 = 20, quick: 2)")
  flags.DEFINE_bool("remat", False, "rematerialise each layer in the backward pass")
  flags.DEFINE_bool("input", True, "also time the trainer's input (prepared synthetic release)")
  flags.DEFINE_string("out", "", "write the results as JSON here")


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
  # The fields of the demo config that steps.py and sharding.py read, with the paper's optimiser
  # settings; data parallel over the local devices.
  config = ml_collections.ConfigDict(dict(
      mode="joint_alternate", seed=0, batch_size=batch, max_text_len=text_len,
      max_regions=regions, mesh={"data": -1}, rules=sharding.RULES["dp"], lr=5e-5,
      total_steps=30_000, warmup_steps=0, weight_decay=0.05, adam_eps=1e-6, clip_norm=1.0,
      grad_accum=1, loss=dict(be="vsepp", margin=0.1, temperature=0.05, ce_weight=1.0),
      model=dict(feature_dim=FEATURES, box_dim=BOX)))
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


PARTS = ("be", "ce")  # the batch parts joint_alternate trains


def prepare_input(root: str, num_images: int, text_len: int, regions: int,
                  log) -> batches.RetrievalData:
  """The train split of a synthetic Flickr30k-format release prepared under `root`, read as the
  trainer reads it (region features from the prepared files, captions tokenised to text_len)."""
  src, out = os.path.join(root, "src"), os.path.join(root, "data")
  t0 = time.perf_counter()
  tfds_builders.quiet()
  data_benchmark.write_release(src, num_images)
  prepare.prepare("flickr30k_butd", src, out, splits=["train"])
  cfg = ml_collections.ConfigDict(dict(
      dataset=dict(name="flickr30k_butd", data_dir=out, tokenizer=os.path.join(src, "vocab.txt")),
      max_regions=regions, max_text_len=text_len))
  data, _ = datasets.load_split(cfg, "train", datasets.get_tokenizer(cfg))
  log(f"input: a prepared release of {data.num_images} images / {data.num_texts} captions, "
      f"10-100 regions each ({time.perf_counter() - t0:.0f}s to write and prepare)")
  return data


def make_batch(data: batches.RetrievalData, batch: int, layout, step: int):
  """The trainer's batch of `step`: rows and negatives, region reads, copy to the devices."""
  lazy = batches.train_batch(data, PARTS, batch, 0, step, lazy=True)
  return sharding.shard_batch(lazy, layout.batch)


def time_input(data: batches.RetrievalData, batch: int, layout, iters: int) -> float:
  """Seconds per batch made synchronously, after one warm-up batch."""
  jax.block_until_ready(make_batch(data, batch, layout, 0))
  t0 = time.perf_counter()
  for step in range(1, iters + 1):
    jax.block_until_ready(make_batch(data, batch, layout, step))
  return (time.perf_counter() - t0) / iters


def bench_size(size: str, batch: int, text_len: int, regions: int, dtype: str, warmup: int,
               iters: int, remat: bool = False, log=None,
               data: batches.RetrievalData | None = None) -> dict:
  """Times `iters` training steps of `size` after `warmup` (compile included there); with
  `data`, also the input per batch and `iters` steps fed by the prefetching input."""
  config, model_cfg = _config(size, batch, text_len, regions, dtype, remat)
  model = heads.RetrievalModel(model_cfg, cls_token_id=1)
  tx = steps.optimizer(config)
  state, layout = sharding.create_train_state(config, model, tx, jax.local_devices(), log=log)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  step = jax.jit(steps.make_train_step(model, config, tx), donate_argnums=(0,),
                 in_shardings=(layout.state, layout.batch))
  fixed = sharding.shard_batch(_random_batch(batch, text_len, regions), layout.batch)
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, metrics = step(state, fixed)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(iters):
    state, metrics = step(state, fixed)
  loss = float(jax.block_until_ready(metrics)["loss"])
  step_s = (time.perf_counter() - t0) / iters
  if not np.isfinite(loss):
    raise FloatingPointError(f"{size}: non-finite loss {loss}")
  hidden, layers, _, mlp = SIZES[size]
  flops = step_flops(batch, text_len, regions, hidden, layers, mlp)
  row = {"size": size, "params_m": n_params / 1e6, "batch": batch, "text_len": text_len,
         "regions": regions, "step_ms": step_s * 1e3, "pairs_per_step": 3 * batch,
         "pairs_per_s": 3 * batch / step_s, "model_tflop_per_step": flops / 1e12,
         "model_tflops": flops / step_s / 1e12, "warmup_s": compile_s, "iters": iters}
  if data is not None:
    row["input_ms"] = time_input(data, batch, layout, iters) * 1e3
    # Timed from the feed's start: the first step waits for its batch, as after a resume.
    t0 = time.perf_counter()
    with prefetch.Feed(functools.partial(make_batch, data, batch, layout), iters) as feed:
      for s in range(1, iters + 1):
        state, metrics = step(state, feed(s))
      jax.block_until_ready(metrics)
    row["fed_step_ms"] = (time.perf_counter() - t0) / iters * 1e3
  return row


def run_benchmark(sizes, quick: bool = False, batch: int = 0, iters: int = 0, remat: bool = False,
                  log=None, with_input: bool = False) -> dict:
  """The matmul peak, then each size's training step: the dict bench.json holds.

  Args:
    sizes: encoder sizes, keys of SIZES.
    quick: small shapes and few steps (a CPU smoke run).
    batch: captions per step (0 = 128, quick: 8); a multiple of the local devices.
    iters: timed steps (0 = 20, quick: 2).
    remat: rematerialise each layer in the backward pass.
    log: gets the progress lines (default: print them).
    with_input: also time the trainer's input on a prepared synthetic release (see the module
      docstring): `input_ms` and `fed_step_ms` per row.
  Raises:
    ValueError: an unknown size or a batch the devices do not divide (named as its flag).
  """
  bad = [s for s in sizes if s not in SIZES]
  if bad:
    raise ValueError(f"sizes: unknown {bad}; expected some of {sorted(SIZES)}")
  log = log or (lambda line: print(line, flush=True))
  dev = jax.local_devices()[0]
  accel = dev.platform in ("gpu", "tpu", "cuda", "rocm")
  dtype = "bfloat16" if accel else "float32"
  batch = batch or (8 if quick else 128)
  text_len, regions = (16, 8) if quick else (72, 50)
  iters = iters or (2 if quick else 20)
  n = 512 if quick else (8192 if accel else 2048)
  devices = jax.local_device_count()
  if batch % devices:
    raise ValueError(f"batch {batch} must be a multiple of the {devices} local devices")

  peak = measure_peak(jnp.dtype(dtype), n) * devices
  log(f"device: {dev.device_kind} ({dev.platform}) x {devices}; compute {dtype}; "
      f"measured matmul peak {peak:.4g} TFLOP/s ({n}^3 {dtype} products, all devices)")
  rows = []
  root = tempfile.mkdtemp(prefix="rerank-bench-train-") if with_input else None
  try:
    # Twice the batch in images: every batch reads a different mix of them.
    data = prepare_input(root, 2 * batch, text_len, regions, log) if with_input else None
    for size in sizes:
      row = bench_size(size, batch, text_len, regions, dtype, warmup=2, iters=iters, remat=remat,
                       log=log, data=data)
      row["mfu"] = row["model_tflops"] / peak
      rows.append(row)
      log(f"  {size}: {row['step_ms']:.1f} ms/step, {row['pairs_per_s']:.0f} pairs/s, "
          f"MFU {100 * row['mfu']:.1f}%" + _input_line(row))
  finally:
    if root:
      shutil.rmtree(root, ignore_errors=True)
  return {"device": dev.device_kind, "platform": dev.platform, "devices": devices,
          "dtype": dtype, "peak_tflops": peak, "peak_matmul_n": n, "quick": quick,
          "remat": remat, "jax": jax.__version__, "rows": rows}


def _input_line(row: dict) -> str:
  if "input_ms" not in row:
    return ""
  bound = "input-bound" if row["input_ms"] > row["step_ms"] else "not input-bound"
  return (f"; input {row['input_ms']:.1f} ms/batch, fed by prefetch {row['fed_step_ms']:.1f} "
          f"ms/step ({bound})")


def table(result: dict) -> str:
  """The results as a markdown table under a line naming the step's shapes."""
  r0 = result["rows"][0]
  batch, text_len, regions = r0["batch"], r0["text_len"], r0["regions"]
  lines = [f"joint_alternate training step, batch {batch} captions ({3 * batch} pairs: "
           f"{batch} BE + {2 * batch} CE), text {text_len}, regions {regions}, "
           f"{result['dtype']}{', remat' if result['remat'] else ''}",
           "| size | params (M) | ms/step | pairs/s | model GFLOP/step | model TFLOP/s | MFU |"
           " input ms/batch | fed ms/step |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    inputs = (f"{r['input_ms']:.1f} | {r['fed_step_ms']:.1f}" if "input_ms" in r else "- | -")
    lines.append(f"| {r['size']} | {r['params_m']:.1f} | {r['step_ms']:.1f} | "
                 f"{r['pairs_per_s']:.0f} | {1e3 * r['model_tflop_per_step']:.1f} | "
                 f"{r['model_tflops']:.4g} | {100 * r['mfu']:.1f}% | {inputs} |")
  return "\n".join(lines)


def main(argv):
  del argv
  sizes = [s for s in FLAGS.sizes.split(",") if s]
  try:
    result = run_benchmark(sizes, FLAGS.quick, FLAGS.batch, FLAGS.iters, FLAGS.remat,
                           with_input=FLAGS.input)
  except ValueError as e:
    cli.fail(f"--{e}")
  print("\n" + table(result))
  if FLAGS.out:
    tmp = FLAGS.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
