"""How well a trained model tells a caption's image from its synthetic_scenes siblings, by edit.

  python -m rerank.sibling_report --workdir=DIR [--split=test] [--which=best|last]

Prints, per kind of edit between a caption's image and a sibling scene, the fraction of
(caption, sibling) pairs where the BE and the CE rank the caption's own image first
(`rerank.evaluation.siblings`).
"""

from absl import flags

from rerank import cli
from rerank.evaluation import siblings

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "A training workdir on synthetic_scenes.")
  flags.DEFINE_string("split", "test", "Split to measure on (train, dev or test).")
  flags.DEFINE_enum("which", "best", ["best", "last"],
                    "best: the best dev checkpoint (else the newest); last: the newest.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require(FLAGS, "workdir")
  try:
    rows, which = siblings.report_workdir(FLAGS.workdir, FLAGS.split, latest=FLAGS.which == "last")
  except (FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  methods = [k for k in ("BE", "CE") if k in rows["all"]]
  print(f"{FLAGS.workdir} ({which}), {FLAGS.split}: own image ranked above a sibling")
  print("| edit | pairs | " + " | ".join(methods) + " |")
  print("|---|---|" + "---|" * len(methods))
  for name, r in rows.items():
    print(f"| {name} | {r['pairs']} | " + " | ".join(f"{r[k]:.3f}" for k in methods) + " |")


if __name__ == "__main__":
  cli.run(main, define_flags)
