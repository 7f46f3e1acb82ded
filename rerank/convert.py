r"""Converts a pretrained PyTorch checkpoint (BERT/XLM-R, OSCAR, M3P, UNITER; ViLT, BLIP) for our models.

  python -m rerank.convert --family={bert,oscar,m3p,uniter,vilt,blip} --src=DIR --dst=DIR [--tokenizer=DIR]
      [--model_config=FILE] [--lower_case=auto|true|false]

vilt: a transformers ViltModel / ViltForImageAndTextRetrieval directory (its retrieval head
becomes the CE head; preprocessor_config.json becomes model.json's "image").

Writes DST/model.json (family, encoder config, special token ids, what was loaded, ignored
or freshly initialised), DST/params (orbax) and DST/tokenizer. Training starts from it with
`--config.init_from=DST`; `python -m rerank.encode --checkpoint=DST` embeds with it. The
destination appears only when complete (written under a temporary name, then renamed). The
conversion itself: `rerank.models.convert.convert`.
"""

from absl import flags

from rerank import cli
from rerank.models import convert as convert_lib
from rerank.models import pretrained

FLAGS = flags.FLAGS


def define_flags():
  families_list = ", ".join(convert_lib.ALL_FAMILIES)
  flags.DEFINE_string("family", None, f"Checkpoint family: one of {families_list}.")
  flags.DEFINE_string("src", None, "Checkpoint directory (config.json + weights) or weights file.")
  flags.DEFINE_string("dst", None, "Output directory (must not exist yet).")
  flags.DEFINE_string(
      "tokenizer", None, "Directory with the tokenizer files when --src has none (M3P: an "
      "xlm-roberta-base directory; UNITER: a bert-base-cased one). Default: --src.")
  flags.DEFINE_string(
      "model_config", None, "The checkpoint's JSON config when it is not --src/config.json "
      "(UNITER: config/uniter-base.json from its repository).")
  flags.DEFINE_enum(
      "lower_case", "auto", ["auto", "true", "false"], "WordPiece lower-casing. auto: "
      "tokenizer_config.json's do_lower_case, else tokenizer.json's normaliser, else inferred "
      "from the vocabulary (cased vocabularies hold capitalised words).")
  flags.DEFINE_integer("seed", 0, "Seed for parameters the checkpoint does not provide.")


def main(argv):
  del argv
  cli.quiet_library_logs()
  cli.require(FLAGS, "family", "src", "dst")
  try:
    convert_lib.convert(FLAGS.family, FLAGS.src, FLAGS.dst, FLAGS.tokenizer, FLAGS.lower_case,
                        FLAGS.seed, FLAGS.model_config)
  except pretrained.ConvertError as e:
    cli.fail(str(e))
  except OSError as e:
    cli.fail(f"cannot write {FLAGS.dst!r}: {e}")


if __name__ == "__main__":
  cli.run(main, define_flags)
