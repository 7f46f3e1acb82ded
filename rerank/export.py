r"""Exports the encoder of a training workdir as a converted checkpoint, to start other runs from.

  python -m rerank.export --workdir=DIR --dst=DIR [--which=best|last] [--part=ce|be]

Writes the layout `rerank.convert` writes: DST/model.json (family "rerank", the encoder config,
special token ids, which checkpoint of which workdir), DST/params (orbax, the encoder only) and
DST/tokenizer/tokenizer.json. So `--config.init_from=DST` fine-tunes from it (a fresh CE head)
and `python -m rerank.encode --checkpoint=DST` embeds with it. Heads are not exported. A
`separate` workdir holds two encoders: `--part` picks one. The destination appears only when
complete (written under a temporary name, then renamed).
"""

import dataclasses

from absl import flags

from rerank import cli
from rerank.inference import engine
from rerank.models import pretrained

FLAGS = flags.FLAGS


def export(workdir: str, dst: str, which: str = "best", part: str = "ce", log=print) -> dict:
  """Writes `dst` from `workdir`'s best (else newest) or newest parameters; returns model.json's
  content. Raises pretrained.ConvertError (destination), FileNotFoundError (workdir) or ValueError
  (an unknown `which` or `part`)."""
  if which not in ("best", "last"):
    raise ValueError(f"--which: expected best or last; found {which!r}")
  if part not in ("ce", "be"):
    raise ValueError(f"--part: expected ce or be; found {part!r}")
  pretrained.check_destination(dst)
  loaded = engine.restore_workdir(workdir, latest=which == "last")
  mode = loaded.mode
  pick = mode.ce_params if part == "ce" else mode.be_params
  encoder = pick(loaded.params)["encoder"]
  tok, model = loaded.tokenizer, loaded.model
  cls_token = tok.id_to_token(model.cls_token_id)
  pad_id = tok.token_to_id("[PAD]")
  meta = {"family": "rerank", "source": [workdir], "checkpoint": loaded.description,
          "mode": mode.name, "part": part if mode.separate else "shared",
          "encoder": dataclasses.asdict(model.cfg), "vocab_size": model.cfg.vocab_size,
          "cls_token": cls_token, "cls_token_id": model.cls_token_id,
          "pad_token": "[PAD]" if pad_id is not None else None, "pad_token_id": pad_id,
          "tokenizer": f"the workdir's ({loaded.config.dataset.name})",
          "report": {"notes": [f"exported from {loaded.description} of a {mode.name} training run"],
                     "new_when_training": ["ce_head (2-way CE head)"]}}
  pretrained.write_converted(dst, meta, encoder, tok)
  log(f"exported the encoder of {workdir} ({loaded.description}, mode {mode.name}) -> {dst}")
  return meta


def define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir (python -m rerank.train --workdir).")
  flags.DEFINE_string("dst", None, "Output directory (must not exist yet, or be empty).")
  flags.DEFINE_enum("which", "best", ["best", "last"],
                    "best: the best dev checkpoint (else the newest); last: the newest.")
  flags.DEFINE_enum("part", "ce", ["ce", "be"], "Which encoder of a `separate` run.")


def main(argv):
  del argv
  cli.quiet_library_logs()
  cli.require(FLAGS, "workdir", "dst")
  try:
    export(FLAGS.workdir, FLAGS.dst, FLAGS.which, FLAGS.part)
  except (pretrained.ConvertError, FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  except OSError as e:
    cli.fail(f"cannot write {FLAGS.dst!r}: {e}")


if __name__ == "__main__":
  cli.run(main, define_flags)
