r"""Embeds a split's images with a trained checkpoint's bi-encoder and saves their index.

  python -m rerank.index --checkpoint=WORKDIR [--dataset=NAME] [--split=test] --out=DIR
"""

from absl import flags
import numpy as np
import tqdm

from rerank import cli
from rerank.data import datasets
from rerank.evaluation import evaluator
from rerank.indexing import indexes
from rerank.inference import retriever
from rerank.models import modes

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("checkpoint", None, "Training workdir whose bi-encoder embeds the corpus.")
  flags.DEFINE_string("dataset", None, "Dataset name (default: the checkpoint config's).")
  flags.DEFINE_string("split", "test", "Split whose images form the corpus.")
  flags.DEFINE_integer("num_images", 0, "Use only the first N images of the split (0 = all).")
  flags.DEFINE_string("out", None, "Directory to write the index to (replaced atomically).")
  flags.DEFINE_enum("backend", None, list(indexes.BACKENDS), "Override config.index.backend.")


def main(argv):
  del argv

  cli.quiet_library_logs()
  if not FLAGS.checkpoint or not FLAGS.out:
    cli.fail("--checkpoint (a training workdir) and --out (the index directory) are required")
  try:
    loaded = retriever.load_model(FLAGS.checkpoint)
  except (FileNotFoundError, ValueError, KeyError) as e:
    cli.fail(f"--checkpoint={FLAGS.checkpoint}: {e}")
  config = loaded.config
  if not modes.get(config.mode).has_be:
    cli.fail(f"--checkpoint: mode {config.mode!r} has no bi-encoder to embed a corpus with")
  config.dataset.name = FLAGS.dataset or config.dataset.name
  if config.dataset.name not in datasets.LOADERS:
    cli.fail(f"--dataset: expected one of {sorted(datasets.LOADERS)}; found {config.dataset.name!r}")
  try:
    data, _ = datasets.load_split(config, FLAGS.split, loaded.tokenizer, FLAGS.num_images or None)
  except (ValueError, KeyError) as e:
    cli.fail(f"--split={FLAGS.split}: {e}")
  print(f"embedding {data.num_images} images of {config.dataset.name}/{FLAGS.split} with "
        f"{loaded.which} of {loaded.workdir}", flush=True)
  scorer = evaluator.Scorer(loaded.model, config.mode, config.eval.batch_size, loaded.params)
  chunk = 4 * config.eval.batch_size
  emb = []
  with tqdm.tqdm(total=data.num_images, desc="embed", unit="img", mininterval=2.0) as bar:
    for a in range(0, data.num_images, chunk):
      emb.append(scorer.images(data, np.arange(a, min(a + chunk, data.num_images))))
      bar.update(len(emb[-1]))
  emb = np.concatenate(emb)
  cfg = config.get("index")
  idx = indexes.build(emb, FLAGS.backend or (cfg.backend if cfg is not None else "auto"), cfg)
  identity = {"checkpoint": loaded.workdir, "which": loaded.which,
              "fingerprint": loaded.fingerprint, "dim": int(emb.shape[1]),
              "dataset": config.dataset.name, "split": FLAGS.split,
              "num_images": int(FLAGS.num_images)}
  indexes.save(idx, FLAGS.out, identity, {"image_ids": data.image_ids})
  print(f"wrote {idx.kind} index of {idx.size} x {idx.dim} to {FLAGS.out}")



if __name__ == "__main__":
  cli.run(main, define_flags)
