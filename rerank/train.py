r"""Trains a retrieval model from a config, then evaluates it on the test split.

  python -m rerank.train --config=configs/demo.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE]

or from Python: `rerank.train.train_and_evaluate(config, workdir)`.

Writes DIR/metrics.jsonl (one JSON object per logged step), TensorBoard events under
DIR/tensorboard, checkpoints under DIR/checkpoints (newest) and DIR/best (best dev score),
and DIR/results.json + DIR/results.md. Rerunning the same command resumes from the newest
checkpoint in DIR; a finished run only re-evaluates. SIGTERM (a preemption notice) saves a
checkpoint at the current step and exits 0. A NaN or inf loss stops the run with an error
naming the step and the losses.

Test hook: RERANK_TEST_PAUSE="STEP:PATH" (tests/test_preemption.py; unset in real runs) makes
the loop, right after running step STEP, create PATH.paused and wait until PATH exists, so a
test can signal or kill the run at a known step.

The same command runs on 1 device, many devices, and many processes (launch/*.sh): the mesh
and parameter layout come from `config.mesh` and `config.rules` (rerank/training/sharding.py),
and multi-host jobs are detected by rerank/training/distributed.py.
"""

import os
import time

from absl import flags
import jax

from rerank import cli
from rerank import errors
from rerank import paths
from rerank.data import batches
from rerank.data import datasets
from rerank.data import prefetch
from rerank.evaluation import evaluator
from rerank.evaluation import parts
from rerank.inference import engine
from rerank.inference import sharded
from rerank.models import build
from rerank.models import modes
from rerank.models import pixels
from rerank.models import pretrained
from rerank.training import checkpoints
from rerank.training import distributed
from rerank.training import metric_writer
from rerank.training import mining
from rerank.training import sharding
from rerank.training import steps
from rerank.training import validate
from rerank.training import workdir as workdir_lib

FLAGS = flags.FLAGS
PREFETCH = 2  # batches made ahead of the step: enough to hide input that is faster than a step


def train_and_evaluate(config, workdir: str, stop_after: int = 0) -> dict | None:
  """Trains `config` in `workdir` (resuming from its newest checkpoint), then evaluates.

  Multi-process jobs call `distributed.initialize()` first, before any device is used.

  Args:
    config: the experiment (the fields of configs/demo.py).
    workdir: output directory; created if missing, resumed if it holds checkpoints.
    stop_after: checkpoint and return after this many steps of this call (0 = run to the end).
  Returns:
    The results dict also written to workdir/results.json ({dataset, split, rows, ...}), or
    None when the run stopped early (`stop_after`, or SIGTERM) with a checkpoint to resume from.
  Raises:
    validate.ConfigError: every problem of the config at once, or a workdir it cannot write;
      raised before anything is written.
    errors.UserError: `workdir` is no workdir of ours, another run holds it, or its checkpoints
      are of another model than `config`'s; raised before anything in it changes.
    steps.NonFiniteLossError: a loss went NaN or inf (checked at every log, dev-evaluation
      and checkpoint step, so no checkpoint holds the bad state).
  """
  # ---------------------------------------------------------------- config and workdir
  validate.check(config, num_devices=jax.device_count())
  workdir_lib.check_destination(workdir)
  _make_workdir(workdir)
  with workdir_lib.Lock(workdir, distributed.log, enabled=distributed.is_main()):
    workdir_lib.check_resumable(config, workdir)
    return _train_and_evaluate(config, workdir, stop_after)


def _train_and_evaluate(config, workdir: str, stop_after: int) -> dict | None:
  """train_and_evaluate in a checked workdir that this run holds."""
  mode = modes.get(config.mode)
  is_main, log = distributed.is_main(), distributed.log

  # ---------------------------------------------------------------- input
  t0 = time.perf_counter()
  tokenizer = datasets.get_tokenizer(config)
  ds, hn = config.dataset, config.hard_negatives
  train, _ = datasets.load_split(config, "train", tokenizer, ds.num_train_images or None)
  dev, _ = datasets.load_split(config, "dev", tokenizer, ds.num_dev_images or None)
  log(f"data: train {train.num_images} images / {train.num_texts} captions, dev "
      f"{dev.num_images} / {dev.num_texts} ({time.perf_counter() - t0:.1f}s)")
  ce_group = dict(config.loss.ce_group) if config.loss.get("ce", "pairwise") == "listwise" else None

  # ---------------------------------------------------------------- model and optimizer
  model = _or_config_error(build.build_model, config, tokenizer.token_to_id("[CLS]"),
                           tokenizer.get_vocab_size())
  tx = steps.optimizer(config)

  # ---------------------------------------------------------------- mesh and sharding
  # config.mesh names the axes; config.rules says which mesh axis each logical axis of the
  # parameters and batches lives on: data parallel, FSDP and tensor parallel by rules only.
  # A jitted init creates the parameters (and optimizer state) directly with their sharding.
  state, layout = _or_config_error(sharding.create_train_state, config, model, tx, log=log)
  mesh = layout.mesh
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  log(f"model: mode={mode.name} size={model.cfg.hidden_size}x{model.cfg.num_layers} "
      f"params={n_params / 1e6:.2f}M on {jax.device_count()} device(s) "
      f"({jax.devices()[0].platform}), {jax.process_count()} process(es), mesh {dict(mesh.shape)}")

  # ---------------------------------------------------------------- update step
  train_step = jax.jit(steps.make_train_step(model, config, tx), donate_argnums=(0,),
                       in_shardings=(layout.state, layout.batch),
                       out_shardings=(layout.state, layout.replicated))

  # ---------------------------------------------------------------- evaluators
  # One jitted program over the training mesh, parameters where training keeps them; the
  # processes share the rows and queries (rerank/inference/sharded.py).
  scorer = engine.DataScorer(sharded.ShardedEngine(model, config.mode, config.eval.batch_size,
                                                   mesh, layout.rules))
  local = scorer.set_params

  def dev_score(params) -> float:
    """Mean of R@1/5/10 both directions on dev: BE when the mode has one, else CE on a sample."""
    methods = ("BE",) if mode.has_be else ("CE",)
    rows = evaluator.evaluate(local(params), dev, config.mode, evaluator.dev_config(config.eval),
                              seed=config.seed, methods=methods, log=lambda *_: None)
    return rows[0]["mR"]

  with checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints) as ckpts:
    # -------------------------------------------------------------- resume
    # Any mix of finished and unfinished steps a kill left; config.json is (re)written only
    # once the state is restored, so a failed resume leaves the workdir as it was.
    start = ckpts.prepare_resume(log, remove_unfinished=is_main)
    if config.get("init_from") and not start:
      encoder = pretrained.load_encoder_params(config.init_from)
      whole = pixels.is_pixel(config)  # a converted pixel checkpoint holds its heads too
      params = _or_config_error(build.with_pretrained_encoder, state["params"], encoder, mode, whole)
      state["params"] = jax.device_put(params, layout.state["params"])
      log(f"init_from {config.init_from}: " + (
          "model loaded, heads included" if whole else "encoder loaded; ce_head freshly initialised")
          + f" ({pretrained.read_meta(config.init_from)['family']})")
    if start:
      state = _restore(ckpts, state, workdir, start)
      log(f"resumed from {workdir}/checkpoints at step {start}")
    if is_main:
      workdir_lib.write_text(paths.join(workdir, workdir_lib.CONFIG),
                             config.to_json_best_effort(indent=2) + "\n")

    # -------------------------------------------------------------- loop
    # Metrics reach the host only at log, dev-evaluation and checkpoint steps (no device sync
    # in between); each of those checks the losses first, so a NaN never becomes a logged
    # dev score, a best checkpoint or a checkpoint to resume from.
    total, mined = config.total_steps, None
    pause = _pause_hook()
    t_last, s_last, checked = time.perf_counter(), start, start

    def make_batch(step, mined):
      """The batch of `step` (1-based), on the devices: a pure function of (seed, step, mined)."""
      batch = batches.train_batch(train, mode.batch_parts, config.batch_size, config.seed,
                                  step - 1, mined, hn.ce_prob, hn.get("confuser_prob", 0.0),
                                  ce_group, hn.get("be_negatives", 0), lazy=True)
      # Rows and negatives are chosen for the global batch on every process alike; each
      # process reads region features for its own devices' rows only.
      return sharding.shard_batch(batch, layout.batch)

    # Input runs PREFETCH steps ahead on a thread of each process (rerank/data/prefetch.py); a
    # resumed run restarts it at its step, as batches need nothing but (seed, step, mined).
    with metric_writer.MetricWriter(workdir, resume_step=start, enabled=is_main) as writer, \
        parts.Sigterm() as preemption, prefetch.Feed(make_batch, total, PREFETCH) as feed:
      for step in range(start + 1, total + 1):
        if hn.every and step - 1 >= hn.start and ((step - 1 - hn.start) % hn.every == 0
                                                  or mined is None):
          # Mine for the rest of this window with the current BE (also right after a resume).
          window_end = step - 1 + hn.every - (step - 1 - hn.start) % hn.every
          feed.close()  # its queued batches drew the old negatives; mining reads features too
          t0 = time.perf_counter()
          mined = mining.mine_window(local(state["params"]), train, config, step - 1,
                                     min(window_end, total) - (step - 1))
          log(f"step {step}: mined {hn.top} BE negatives for {len(mined)} captions "
              f"({time.perf_counter() - t0:.1f}s)")
        state, step_metrics = train_step(state, feed(step, mined))
        if pause is not None and step == pause[0]:
          _pause(pause[1])

        is_log = step % config.log_every == 0 or step == total
        is_eval = bool(config.eval_every) and (step % config.eval_every == 0 or step == total)
        stopping = bool(stop_after) and step - start >= stop_after and step < total
        preempted = preemption.reached(step) and step < total
        is_ckpt = step % config.checkpoint_every == 0 or step == total or stopping or preempted
        if not (is_log or is_eval or is_ckpt):
          continue
        row = dict(jax.device_get(step_metrics))
        steps.check_finite(step, row, checked)
        checked = step
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
        if is_log or is_eval:  # one metrics.jsonl line per logged step, always with the loss
          writer.write(step, row)
        if is_ckpt:
          ckpts.save(step, state)
        if stopping or preempted:
          ckpts.wait()
          why = "SIGTERM" if preempted else f"stop_after={stop_after}"
          log(f"stopped after step {step} ({why}); checkpoint saved, rerun the same command to "
              "continue", flush=True)
          return None
    ckpts.wait()

    # -------------------------------------------------------------- final evaluation
    params, which = state["params"], f"final (step {int(state['step'])})"
    if config.eval.use_best and ckpts.best.best_step() is not None:
      params, which = ckpts.restore_params(state, prefer_best=True)
  log(f"evaluating {which} parameters")
  # config.eval.split may also be a fold mean (test@5x1k) or an enlarged set (test+cc_dev:dev).
  # Finished parts are kept in the workdir; SIGTERM stops between them and a rerun goes on.
  try:
    with parts.Sigterm(first=total) as stop:
      store = evaluator.final_parts(workdir, config, which, stop, log)
      results = evaluator.evaluate_config(local(params), config, tokenizer, log=log,
                                          num_images=ds.num_test_images or None, parts=store)
  except parts.Interrupted as e:
    log(f"stopped before evaluation part {e} (SIGTERM); finished parts kept in "
        f"{workdir}/eval_parts, rerun the same command to continue", flush=True)
    return None
  results["checkpoint"] = which
  if is_main:
    table = evaluator.write_results(workdir, results)
    log("\n" + table)
    log(f"wrote {workdir}/results.json, results.md, metrics.jsonl")
  store.discard()
  return results


def _make_workdir(path: str) -> None:
  """Creates `path` and checks it is writable; raises ConfigError if not."""
  if not path:
    raise validate.ConfigError("workdir: expected a directory path; found nothing")
  try:
    paths.make_dirs(path)  # a local directory or a gs:// bucket prefix
    # Several processes, maybe on several hosts, probe at once.
    probe = paths.join(path, f".write_test.{jax.process_index()}.{os.getpid()}")
    paths.write_text(probe, "")
    paths.remove(probe)
  except OSError as e:
    raise validate.ConfigError(f"cannot create or write workdir {path!r}: {e.strerror or e}") from e


def _pause_hook() -> tuple[int, str] | None:
  """(STEP, PATH) of the test hook RERANK_TEST_PAUSE="STEP:PATH" (module docstring), or None."""
  value = os.environ.get("RERANK_TEST_PAUSE", "")
  if not value:
    return None
  step, _, path = value.partition(":")
  return int(step), path


def _pause(path: str) -> None:
  """Creates path.paused and waits for path (the test hook); a SIGTERM meanwhile is noted."""
  with open(path + ".paused", "w"):
    pass
  while not os.path.exists(path):
    time.sleep(0.01)


def _restore(ckpts, state, workdir: str, step: int):
  """The train state of checkpoints/`step`, laid out like `state`; UserError if it cannot be."""
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  try:
    restored = ckpts.restore_state(abstract, step)
  except Exception as e:  # noqa: BLE001  orbax and tensorstore raise bare Exception for bad data
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise errors.UserError(
        f"{workdir}/checkpoints/{step}: cannot restore it into the config's train state "
        f"({reason}); move that step away to resume from an older one, or train in a new "
        "--workdir") from e
  if int(restored["step"]) != step:
    raise errors.expected(f"{workdir}/checkpoints/{step}", f"the train state of step {step}",
                          f"step {int(restored['step'])}")
  return restored


def _or_config_error(fn, *args, **kwargs):
  """fn(*args, **kwargs), its ValueError (a config that does not fit the checkpoint, mesh or
  model) as a ConfigError."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    raise validate.ConfigError(str(e)) from e


# ------------------------------------------------------------------ command line

def define_flags():
  cli.define_config_flag()
  flags.DEFINE_string("workdir", None, "Output directory (created; resumed if it has checkpoints).")
  flags.DEFINE_integer(
      "stop_after", 0, "Checkpoint and exit after this many steps of this invocation (0 = run to "
      "the end); rerunning the same command continues. For time-sliced jobs and resume tests.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.quiet_library_logs()
  try:
    kind = distributed.initialize()  # before any device is touched
  except ValueError as e:
    cli.fail(str(e))
  distributed.log(distributed.describe(kind), flush=True)
  config = cli.load_config()
  try:
    train_and_evaluate(config, FLAGS.workdir, stop_after=FLAGS.stop_after)
  except steps.NonFiniteLossError as e:
    cli.fail(str(e))
  except OSError as e:  # disk full, a read-only or vanished workdir mid-run
    cli.fail(f"{e.filename or FLAGS.workdir}: {e.strerror or e} (the newest checkpoint in "
             "--workdir is intact: rerun the same command to resume once this is fixed)")


if __name__ == "__main__":
  cli.run(main, define_flags)
