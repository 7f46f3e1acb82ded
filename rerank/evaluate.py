r"""Re-evaluates a trained workdir: BE / CE / RR rows into results.json and results.md.

  python -m rerank.evaluate --config=configs/demo.py --workdir=DIR [--latest] [--out=DIR]
  launch/local_multiprocess.sh 2 python -m rerank.evaluate --config=... --workdir=DIR

Evaluates the best-by-dev (else the newest; `--latest`: the newest) checkpoint of DIR on
`config.eval.split` and writes DIR/results.json and DIR/results.md (or into --out). The work
runs over every device of every process (the config's mesh and rules; multi-host jobs are
detected as by the trainer). Finished parts are kept under OUT/eval_parts/ until the results
are written: SIGTERM stops at the next part and exits 0, and the same command continues.
From Python: `rerank.evaluation.evaluator.evaluate_workdir(config, workdir, latest, out=...)`.
"""

import os

from absl import flags

from rerank import cli
from rerank.evaluation import evaluator
from rerank.evaluation import parts
from rerank.training import distributed

FLAGS = flags.FLAGS


def define_flags():
  cli.define_config_flag()
  flags.DEFINE_string("workdir", None, "A training workdir with checkpoints.")
  flags.DEFINE_bool("latest", False, "Evaluate the newest checkpoint instead of the best.")
  flags.DEFINE_string("out", None, "Directory for results.json/results.md (default: the "
                      "workdir). Keeps one copy per re-evaluation (other splits, k, ...).")


def main(argv):
  del argv
  cli.quiet_library_logs()
  try:
    distributed.initialize()  # before any device is touched
  except ValueError as e:
    cli.fail(str(e))
  config = cli.load_config()
  workdir = FLAGS.workdir
  if not workdir or not os.path.isdir(workdir):
    cli.fail(f"--workdir {workdir!r} does not exist; train first with "
             f"python -m rerank.train --config=... --workdir={workdir}")
  ckpt_dirs = [os.path.join(workdir, d) for d in ("checkpoints", "best")]
  if not any(os.path.isdir(d) and os.listdir(d) for d in ckpt_dirs):
    cli.fail(f"no checkpoint in {workdir!r} (looked in {', '.join(ckpt_dirs)}); "
             "train first or pass the workdir of a trained run")
  out = FLAGS.out or workdir
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    cli.fail(f"--out {out!r}: cannot create it ({e.strerror})")
  try:
    with parts.Sigterm() as stop:
      results = evaluator.evaluate_workdir(config, workdir, latest=FLAGS.latest,
                                           log=distributed.log, out=out, stop=stop)
  except parts.Interrupted as e:
    distributed.log(f"stopped before part {e} (SIGTERM); finished parts kept in {out}/eval_parts, "
                    "rerun the same command to continue", flush=True)
    return
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  distributed.log("\n" + evaluator.results_markdown(results))
  distributed.log(f"wrote {out}/results.json, results.md")


if __name__ == "__main__":
  cli.run(main, define_flags)
