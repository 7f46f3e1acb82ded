r"""Re-evaluates a trained workdir: BE / CE / RR rows into results.json and results.md.

  python -m rerank.evaluate --config=configs/demo.py --workdir=DIR [--latest] [--out=DIR]

Evaluates the best-by-dev (else the newest; `--latest`: the newest) checkpoint of DIR on
`config.eval.split` and writes DIR/results.json and DIR/results.md (or into --out).
"""

import functools
import os

from absl import flags
import jax

from rerank.models import build

from rerank import cli
from rerank.data import datasets
from rerank.data import eval_sets
from rerank.evaluation import evaluator
from rerank.training import checkpoints
from rerank.training import steps

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
  config = cli.load_config()
  workdir = FLAGS.workdir
  if not workdir or not os.path.isdir(workdir):
    cli.fail(f"--workdir {workdir!r} does not exist; train first with "
             f"python -m rerank.train --config=... --workdir={workdir}")
  ckpt_dirs = [os.path.join(workdir, d) for d in ("checkpoints", "best")]
  if not any(os.path.isdir(d) and os.listdir(d) for d in ckpt_dirs):
    cli.fail(f"no checkpoint in {workdir!r} (looked in {', '.join(ckpt_dirs)}); "
             "train first or pass the workdir of a trained run")
  tokenizer = datasets.get_tokenizer(config)
  model = build.build_model(config, tokenizer.token_to_id("[CLS]"), tokenizer.get_vocab_size())
  tx = steps.optimizer(config)

  abstract = jax.eval_shape(functools.partial(steps.init_train_state, model, config, tx),
                            jax.random.PRNGKey(0))
  ckpts = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints)
  try:
    params, which = ckpts.restore_params(abstract, prefer_best=config.eval.use_best and not FLAGS.latest)
  except (ValueError, KeyError, FileNotFoundError) as e:
    cli.fail(f"checkpoint in {workdir!r} does not match config (mode={config.mode}, "
             f"model={config.model.hidden_size}x{config.model.num_layers}): {e}")
  finally:
    ckpts.close()
  print(f"evaluating {which} parameters")
  scorer = evaluator.Scorer(model, config.mode, config.eval.batch_size, params)
  # config.eval.split may also be a fold mean (test@5x1k) or an enlarged set (test+cc_dev:dev).
  evaluate_fn = functools.partial(evaluator.evaluate, index_cfg=config.get("index"))
  results = eval_sets.results(config, config.eval.split, tokenizer, datasets.load_split,
                              evaluate_fn, scorer, num_images=config.dataset.num_test_images or None)
  results["checkpoint"] = which
  out = FLAGS.out or workdir
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    cli.fail(f"--out {out!r}: cannot create it ({e.strerror})")
  print("\n" + evaluator.write_results(out, results))
  print(f"wrote {out}/results.json, results.md")



if __name__ == "__main__":
  cli.run(main, define_flags)
