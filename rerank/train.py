r"""Trains a retrieval model from a config file, then evaluates it on the test split.

  python -m rerank.train --config=configs/demo.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE]

Writes DIR/metrics.jsonl (one JSON object per logged step), TensorBoard events under
DIR/tensorboard, checkpoints under DIR/checkpoints (newest) and DIR/best (best dev score),
and DIR/results.json + DIR/results.md. Rerunning the same command resumes from the newest
checkpoint in DIR; a finished run only re-evaluates. SIGTERM (a preemption notice) saves a
checkpoint at the current step and exits 0.

The same command runs on 1 device, many devices, and many processes (launch/*.sh): the mesh
and parameter layout come from `config.mesh` and `config.rules` (rerank/sharding.py), and
multi-host jobs are detected by rerank/distributed.py.
"""

import functools
import os
import signal
import time

from absl import app
from absl import flags
import jax
from jax.experimental import multihost_utils

from rerank.models import build

from rerank.training import checkpoints
from rerank import cli
from rerank.training import distributed
from rerank.evaluation import evaluator
from rerank.training import metric_writer
from rerank.training import mining
from rerank.training import sharding
from rerank.training import steps
from rerank.data import batches
from rerank.data import datasets
from rerank.data import eval_sets
from rerank.models import modes
from rerank.models import pretrained

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; resumed if it has checkpoints).")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", 0, "Checkpoint and exit after this many steps of this invocation (0 = run to the "
    "end); rerunning the same command continues. For time-sliced jobs and resume tests.")


class Preemption:
  """SIGTERM (a preemption notice) -> every process checkpoints at the same step and exits 0.

  One process: a Python SIGTERM handler sets a flag. Several processes: jax's preemption
  service (started by `jax.distributed.initialize`) catches SIGTERM on any host, tells the
  others, and `reached_preemption_sync_point` turns True on all of them at the same step.
  """

  def __init__(self):
    self.requested = False
    self.multihost = jax.process_count() > 1
    if not self.multihost:
      signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Call once per step on every process; True when this step must be the last."""
    if self.multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def release(self) -> None:
    """After training: the final evaluation cannot checkpoint, so SIGTERM ends it at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv):
  del argv
  cli.quiet_library_logs()
  try:
    distributed.initialize()  # before any device is touched
  except ValueError as e:
    cli.fail(str(e))
  preemption = Preemption()
  config = cli.load_config(_CONFIG)
  if config.get("init_from") and not pretrained.is_converted(config.init_from):
    cli.fail(f"config.init_from {config.init_from!r}: not a converted checkpoint (no model.json and "
             "params/); make one with python -m rerank.convert --family=... --src=... --dst=DIR")
  hn = config.hard_negatives
  if hn.every and config.mode == "ce":
    cli.fail("config.hard_negatives.every: mining needs a bi-encoder; found mode='ce'")
  if hn.ce_prob and config.mode == "be":
    cli.fail("config.hard_negatives.ce_prob: mined CE negatives need a cross-encoder; "
             "found mode='be'")
  if hn.get("be_negatives", 0) and config.mode == "ce":
    cli.fail("config.hard_negatives.be_negatives: needs a bi-encoder; found mode='ce'")

  ce_loss_name = config.loss.get("ce", "pairwise")
  if ce_loss_name not in ("pairwise", "listwise"):
    cli.fail(f"config.loss.ce: expected 'pairwise' or 'listwise'; found {ce_loss_name!r}")
  workdir = cli.make_workdir(_WORKDIR.value)
  is_main = distributed.is_main()
  log = distributed.log
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")

  # ---------------------------------------------------------------- input
  t0 = time.perf_counter()
  tokenizer = datasets.get_tokenizer(config)
  ds = config.dataset
  train, _ = datasets.load_split(config, "train", tokenizer, ds.num_train_images or None)
  dev, _ = datasets.load_split(config, "dev", tokenizer, ds.num_dev_images or None)
  log(f"data: train {train.num_images} images / {train.num_texts} captions, dev "
      f"{dev.num_images} / {dev.num_texts} ({time.perf_counter() - t0:.1f}s)")

  # ---------------------------------------------------------------- model and optimizer
  try:
    model = build.build_model(config, tokenizer.token_to_id("[CLS]"), tokenizer.get_vocab_size())
  except ValueError as e:
    cli.fail(str(e))
  tx = steps.optimizer(config)

  # ---------------------------------------------------------------- mesh and sharding
  # config.mesh names the axes; config.rules says which mesh axis each logical axis of the
  # parameters and batches lives on: data parallel, FSDP and tensor parallel by rules only.
  # A jitted init creates the parameters (and optimizer state) directly with their sharding.
  try:
    state, layout = sharding.create_train_state(config, model, tx)
  except ValueError as e:
    cli.fail(str(e))
  mesh, rules = layout.mesh, layout.rules
  state_sharded, batch_sharded, replicated = layout.state, layout.batch, layout.replicated
  ways = sharding.batch_divisor(mesh, rules) * config.grad_accum
  if config.batch_size % ways:
    cli.fail(f"config.batch_size: expected a multiple of {ways} (batch axis "
             f"{rules.get('batch')!r} of mesh {dict(mesh.shape)} x grad_accum "
             f"{config.grad_accum}); found {config.batch_size}")
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  log(f"model: mode={config.mode} size={model.cfg.hidden_size}x{model.cfg.num_layers} "
      f"params={n_params / 1e6:.2f}M on {jax.device_count()} device(s) ({jax.devices()[0].platform}), "
      f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}")

  # ---------------------------------------------------------------- resume
  ckpts = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints)
  start = 0
  if config.get("init_from") and ckpts.latest_step() is None:
    state["params"] = jax.device_put(build.with_pretrained_encoder(
        state["params"], pretrained.load_encoder_params(config.init_from), config.mode),
        state_sharded["params"])
    log(f"init_from {config.init_from}: encoder loaded ({pretrained.read_meta(config.init_from)['family']}); "
        "ce_head freshly initialised")
  if ckpts.latest_step() is not None:
    state = ckpts.restore_state(jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    start = int(state["step"])
    log(f"resumed from {workdir}/checkpoints at step {start}")

  # ---------------------------------------------------------------- update step
  train_step = jax.jit(steps.make_train_step(model, config, tx), donate_argnums=(0,),
                       in_shardings=(state_sharded, batch_sharded),
                       out_shardings=(state_sharded, replicated))

  # ---------------------------------------------------------------- evaluators
  # Every process evaluates alike on its own first device, from a gathered copy of the params.
  scorer = evaluator.Scorer(model, config.mode, config.eval.batch_size)
  local = lambda params: scorer.set_params(sharding.local_replica(params, mesh))  # noqa: E731

  def dev_score(params) -> float:
    """Mean of R@1/5/10 both directions on dev: BE when the mode has one, else CE on a sample."""
    methods = ("BE",) if config.mode != "ce" else ("CE",)
    rows = evaluator.evaluate(local(params), dev, config.mode, config.eval,
                             seed=config.seed, methods=methods, log=lambda *_: None)
    return rows[0]["mR"]

  # ---------------------------------------------------------------- loop
  writer = metric_writer.MetricWriter(workdir, resume_step=start, enabled=is_main)
  total = config.total_steps
  mined = None
  ce_group = dict(config.loss.ce_group) if ce_loss_name == "listwise" else None
  t_last, s_last = time.perf_counter(), start
  for step in range(start + 1, total + 1):
    if hn.every and step - 1 >= hn.start and ((step - 1 - hn.start) % hn.every == 0 or mined is None):
      # Mine for the rest of this window with the current BE (also right after a resume).
      window_end = step - 1 + hn.every - (step - 1 - hn.start) % hn.every
      t0 = time.perf_counter()
      mined = mining.mine_window(local(state["params"]), train, config, step - 1,
                                 min(window_end, total) - (step - 1))
      log(f"step {step}: mined {hn.top} BE negatives for {len(mined)} captions "
          f"({time.perf_counter() - t0:.1f}s)")
    batch = batches.train_batch(train, modes.get(config.mode).batch_parts, config.batch_size, config.seed, step - 1,
                                mined, hn.ce_prob, hn.get("confuser_prob", 0.0), ce_group,
                                hn.get("be_negatives", 0), lazy=True)
    # Rows and negatives are chosen for the global batch on every process alike; each process
    # reads region features for its own devices' rows only.
    batch = sharding.shard_batch(batch, batch_sharded)
    state, step_metrics = train_step(state, batch)
    is_log = step % config.log_every == 0 or step == total
    is_eval = bool(config.eval_every) and (step % config.eval_every == 0 or step == total)
    if is_log or is_eval:
      # One metrics.jsonl line per logged step, always with the loss (DESIGN §4).
      row = dict(jax.device_get(step_metrics))
      if is_log:
        now = time.perf_counter()
        rate = (step - s_last) / (now - t_last)
        t_last, s_last = now, step
        row["steps_per_second"] = rate
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(row.items())
                         if k.endswith("loss") or k.endswith("acc"))
        log(f"step {step}/{total} {shown} ({rate:.1f} steps/s, eta {(total - step) / rate:.0f}s)",
            flush=True)
      if is_eval:
        row["dev_score"] = dev_score(state["params"])
        ckpts.save_best(step, state["params"], row["dev_score"])
        log(f"step {step}: dev mR {row['dev_score']:.2f}", flush=True)
      writer.write(step, row)
    stopping = _STOP_AFTER.value and step - start >= _STOP_AFTER.value and step < total
    preempted = preemption.reached(step) and step < total
    if step % config.checkpoint_every == 0 or step == total or stopping or preempted:
      ckpts.save(step, state)
    if stopping or preempted:
      ckpts.wait()
      ckpts.close()
      writer.close()
      why = "SIGTERM" if preempted else f"--stop_after={_STOP_AFTER.value}"
      log(f"stopped after step {step} ({why}); checkpoint saved, rerun the same command to continue",
          flush=True)
      return
  preemption.release()
  ckpts.wait()
  writer.close()

  # ---------------------------------------------------------------- final evaluation
  params, which = state["params"], f"final (step {int(state['step'])})"
  if config.eval.use_best and ckpts.best.best_step() is not None:
    params, which = ckpts.restore_params(state, prefer_best=True)
  ckpts.close()
  log(f"evaluating {which} parameters")
  # config.eval.split may also be a fold mean (test@5x1k) or an enlarged set (test+cc_dev:dev).
  evaluate_fn = functools.partial(evaluator.evaluate, index_cfg=config.get("index"))
  results = eval_sets.results(config, config.eval.split, tokenizer, datasets.load_split,
                              evaluate_fn, local(params), log=log,
                              num_images=ds.num_test_images or None)
  results["checkpoint"] = which
  if is_main:
    table = evaluator.write_results(workdir, results)
    log("\n" + table)
    log(f"wrote {workdir}/results.json, results.md, metrics.jsonl")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
