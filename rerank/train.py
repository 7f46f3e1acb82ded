r"""Trains a retrieval model from a config file, then evaluates it on the test split.

  python -m rerank.train --config=configs/demo.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE]

Writes DIR/metrics.jsonl (one JSON object per logged step), TensorBoard events under
DIR/tensorboard, checkpoints under DIR/checkpoints (newest) and DIR/best (best dev score),
and DIR/results.json + DIR/results.md. Rerunning the same command resumes from the newest
checkpoint in DIR; a finished run only re-evaluates.
"""

import functools
import os
import time

from absl import app
from absl import flags
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from rerank import checkpoint
from rerank import cli
from rerank import evaluate
from rerank import metric_writer
from rerank import mining
from rerank import steps
from rerank.data import batches
from rerank.data import datasets
from rerank.models import load

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; resumed if it has checkpoints).")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", 0, "Checkpoint and exit after this many steps of this invocation (0 = run to the "
    "end); rerunning the same command continues. For time-sliced jobs and resume tests.")


def main(argv):
  del argv
  cli.quiet_library_logs()
  config = cli.load_config(_CONFIG)
  if config.get("init_from") and not load.is_converted(config.init_from):
    cli.fail(f"config.init_from {config.init_from!r}: not a converted checkpoint (no model.json and "
             "params/); make one with python -m rerank.convert --family=... --src=... --dst=DIR")
  hn = config.hard_negatives
  if hn.every and config.mode not in ("joint_alternate", "joint_sum", "separate"):
    cli.fail(f"config.hard_negatives needs a BE and a CE (a joint or separate mode); "
             f"found mode={config.mode!r}")

  if config.loss.ce not in ("pairwise", "listwise"):
    cli.fail(f"config.loss.ce: expected 'pairwise' or 'listwise'; found {config.loss.ce!r}")
  workdir = cli.make_workdir(_WORKDIR.value)
  is_main = jax.process_index() == 0
  log = print if is_main else (lambda *a, **k: None)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")

  # ---------------------------------------------------------------- mesh
  # Data parallel over every device; parameters replicated. Finer layouts (FSDP, tensor
  # parallel) come from logical-axis rules in the scale-out work.
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = NamedSharding(mesh, P())
  data_sharded = NamedSharding(mesh, P("data"))
  if config.batch_size % jax.device_count():
    cli.fail(f"config.batch_size: expected a multiple of the {jax.device_count()} devices; "
             f"found {config.batch_size}")

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
    model = steps.build_model(config, tokenizer.token_to_id("[CLS]"), tokenizer.get_vocab_size())
  except ValueError as e:
    cli.fail(str(e))
  tx = steps.optimizer(config)

  # Jitted init creates the parameters directly with their sharding.
  init_state = functools.partial(steps.init_train_state, model, config, tx)
  state = jax.jit(init_state, out_shardings=replicated)(jax.random.PRNGKey(config.seed))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  log(f"model: mode={config.mode} size={model.cfg.hidden_size}x{model.cfg.num_layers} "
      f"params={n_params / 1e6:.2f}M on {jax.device_count()} device(s) ({jax.devices()[0].platform})")

  # ---------------------------------------------------------------- resume
  ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
  start = 0
  if config.get("init_from") and ckpts.latest_step() is None:
    state["params"] = jax.device_put(steps.with_pretrained_encoder(
        state["params"], load.load_encoder_params(config.init_from), config.mode), replicated)
    log(f"init_from {config.init_from}: encoder loaded ({load.read_meta(config.init_from)['family']}); "
        "ce_head freshly initialised")
  if ckpts.latest_step() is not None:
    state = ckpts.restore_state(jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    start = int(state["step"])
    log(f"resumed from {workdir}/checkpoints at step {start}")

  # ---------------------------------------------------------------- update step
  train_step = jax.jit(steps.make_train_step(model, config, tx), donate_argnums=(0,),
                       in_shardings=(replicated, data_sharded), out_shardings=(replicated, replicated))

  # ---------------------------------------------------------------- evaluators
  scorer = evaluate.Scorer(model, config.mode, config.eval.batch_size)

  def dev_score(params) -> float:
    """Mean of R@1/5/10 both directions on dev: BE when the mode has one, else CE on a sample."""
    methods = ("BE",) if config.mode != "ce" else ("CE",)
    rows = evaluate.evaluate(scorer.set_params(params), dev, config.mode, config.eval,
                             seed=config.seed, methods=methods, log=lambda *_: None)
    return rows[0]["mR"]

  # ---------------------------------------------------------------- loop
  writer = metric_writer.MetricWriter(workdir, resume_step=start, enabled=is_main)
  total = config.total_steps
  mined = None
  ce_group = dict(config.loss.ce_group) if config.loss.ce == "listwise" else None
  t_last, s_last = time.perf_counter(), start
  for step in range(start + 1, total + 1):
    if hn.every and step - 1 >= hn.start and ((step - 1 - hn.start) % hn.every == 0 or mined is None):
      # Mine for the rest of this window with the current BE (also right after a resume).
      window_end = step - 1 + hn.every - (step - 1 - hn.start) % hn.every
      t0 = time.perf_counter()
      mined = mining.mine_window(scorer.set_params(state["params"]), train, config, step - 1,
                                 min(window_end, total) - (step - 1))
      log(f"step {step}: mined {hn.top} BE negatives for {len(mined)} captions "
          f"({time.perf_counter() - t0:.1f}s)")
    batch = batches.train_batch(train, config.mode, config.batch_size, config.seed, step - 1,
                                mined, hn.ce_prob, hn.confuser_prob, ce_group)
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
    if step % config.checkpoint_every == 0 or step == total or stopping:
      ckpts.save(step, state)
    if stopping:
      ckpts.wait()
      log(f"stopped after step {step} (--stop_after={_STOP_AFTER.value}); rerun to continue")
      return
  ckpts.wait()
  writer.close()

  # ---------------------------------------------------------------- final evaluation
  params, which = state["params"], f"final (step {int(state['step'])})"
  if config.eval.use_best and ckpts.best.best_step() is not None:
    params, which = ckpts.restore_params(state, prefer_best=True)
  ckpts.close()
  test, _ = datasets.load_split(config, config.eval.split, tokenizer, ds.num_test_images or None)
  log(f"evaluating {which} parameters on {config.eval.split}: {test.num_images} images, "
      f"{test.num_texts} texts")
  rows = evaluate.evaluate(scorer.set_params(params), test, config.mode, config.eval,
                           seed=config.seed, log=log)
  results = {"dataset": ds.name, "split": config.eval.split, "num_images": test.num_images,
             "num_texts": test.num_texts, "checkpoint": which, "rows": rows}
  if is_main:
    table = evaluate.write_results(workdir, results)
    log("\n" + table)
    log(f"wrote {workdir}/results.json, results.md, metrics.jsonl")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
