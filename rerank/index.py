r"""Embeds a split's images with a trained checkpoint's bi-encoder and saves their index.

  python -m rerank.index --checkpoint=WORKDIR [--dataset=NAME] [--split=test] --out=DIR

The glue between a model and the index library (which knows only arrays): restore the
workdir, embed the split's images with the engine, build the index, save it with the
checkpoint's identity. From Python: `build_index(checkpoint, out, ...)`.
"""

from absl import flags
import numpy as np

from rerank import cli
from rerank.data import datasets
from rerank.indexing import indexes
from rerank.inference import engine
from rerank.inference import sharded

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("checkpoint", None, "Training workdir whose bi-encoder embeds the corpus.")
  flags.DEFINE_string("dataset", None, "Dataset name (default: the checkpoint config's).")
  flags.DEFINE_string("split", "test", "Split whose images form the corpus.")
  flags.DEFINE_integer("num_images", 0, "Use only the first N images of the split (0 = all).")
  flags.DEFINE_string("out", None, "Directory to write the index to (replaced atomically).")
  flags.DEFINE_enum("backend", None, list(indexes.BACKENDS), "Override config.index.backend.")


def build_index(checkpoint: str, out: str, dataset: str | None = None, split: str = "test",
                num_images: int = 0, backend: str | None = None, log=print):
  """Embeds the images of `dataset`/`split` (the first `num_images`; 0 = all) with the BE of
  the training workdir `checkpoint`, and saves their index to `out`; returns the index.

  `backend` defaults to the checkpoint config's index.backend. Raises FileNotFoundError or
  ValueError naming the flag at fault.
  """
  try:
    restored = sharded.restore_workdir(checkpoint)  # on the config's mesh, every device
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise ValueError(f"--checkpoint={checkpoint}: {e}") from e
  config = restored.config
  if not restored.mode.has_be:
    raise ValueError(f"--checkpoint: mode {config.mode!r} has no bi-encoder to embed a corpus with")
  config.dataset.name = dataset or config.dataset.name
  if config.dataset.name not in datasets.LOADERS:
    raise ValueError(f"--dataset: expected one of {sorted(datasets.LOADERS)}; "
                     f"found {config.dataset.name!r}")
  try:
    data, _ = datasets.load_split(config, split, restored.tokenizer, num_images or None)
  except (ValueError, KeyError) as e:
    raise ValueError(f"--split={split}: {e}") from e
  log(f"embedding {data.num_images} images of {config.dataset.name}/{split} with "
      f"{restored.description} of {restored.path}", flush=True)
  emb = sharded.engine_for(restored, config.eval.batch_size).embed_images(
      *engine.image_rows(data, np.arange(data.num_images)), desc="embed")  # [N, H]
  cfg = config.get("index")
  idx = indexes.build(emb, backend or (cfg.backend if cfg is not None else "auto"), cfg)
  identity = {"checkpoint": restored.path, "which": restored.description,
              "fingerprint": restored.fingerprint, "dim": int(emb.shape[1]),
              "dataset": config.dataset.name, "split": split, "num_images": int(num_images)}
  indexes.save(idx, out, identity, {"image_ids": data.image_ids})
  log(f"wrote {idx.kind} index of {idx.size} x {idx.dim} to {out}")
  return idx


def main(argv):
  del argv
  cli.quiet_library_logs()
  if not FLAGS.checkpoint or not FLAGS.out:
    cli.fail("--checkpoint (a training workdir) and --out (the index directory) are required")
  try:
    build_index(FLAGS.checkpoint, FLAGS.out, FLAGS.dataset, FLAGS.split, FLAGS.num_images,
                FLAGS.backend)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  cli.run(main, define_flags)
