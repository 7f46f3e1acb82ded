r"""Embeds a split's images with a trained checkpoint's bi-encoder and saves their index.

  python -m rerank.index --checkpoint=WORKDIR [--dataset=NAME] [--split=test] --out=DIR \
      [--target_recall=0.95] [--overwrite]

The glue between a model and the index library (which knows only arrays): restore the
workdir, embed the split's images with the engine, build the index, save it with the
checkpoint's identity. From Python: `build_index(checkpoint, out, ...)`.

A ScaNN index searches the number of leaves that reaches `config.index.target_recall`
(`--target_recall` overrides it): measured at build time against exact search on a sample of
the split's captions (text queries, which sit elsewhere in the space than the images), and
recorded in the index's index.json under "scann" / "calibration".

DIR must be absent or empty, or hold an index of ours and `--overwrite` be given: the index
replaces DIR whole, so any other folder (`.`, a training workdir, notes) is refused.
"""

import json
import os

from absl import flags
import ml_collections
import numpy as np

from rerank import cli
from rerank import errors
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
  flags.DEFINE_string("out", None, "Directory to write the index to: absent or empty, or an index "
                      "to replace with --overwrite (replaced atomically).")
  flags.DEFINE_bool("overwrite", False, "Replace the index already in --out (never another kind "
                    "of directory).")
  flags.DEFINE_enum("backend", None, list(indexes.BACKENDS), "Override config.index.backend.")
  flags.DEFINE_float("target_recall", None, "ScaNN: search the fewest leaves reaching this "
                     "recall@index.recall_k vs exact search (overrides config.index.target_recall "
                     "and .leaves_to_search; 0 = no calibration).")


def check_out(out: str, overwrite: bool = False) -> None:
  """Raises UserError unless `out` is absent, empty, or an index of ours and `overwrite`."""
  if not os.path.lexists(out):
    return
  where = f"--out {out!r}"
  if not os.path.isdir(out):
    raise errors.expected(where, "a directory for the index", "a file")
  entries = sorted(os.listdir(out))
  if not entries:
    return
  if not _is_index(out):
    raise errors.expected(where, "an empty directory or an index written by rerank.index",
                          f"{errors.entries(entries)}; choose another --out")
  if not overwrite:
    raise errors.expected(where, "a new directory", "an index already; pass --overwrite to "
                          "replace it")


def _is_index(path: str) -> bool:
  try:
    with open(os.path.join(path, "index.json"), encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(meta, dict) and "kind" in meta and "identity" in meta


def build_index(checkpoint: str, out: str, dataset: str | None = None, split: str = "test",
                num_images: int = 0, backend: str | None = None, log=print,
                target_recall: float | None = None, overwrite: bool = False):
  """Embeds the images of `dataset`/`split` (the first `num_images`; 0 = all) with the BE of
  the training workdir `checkpoint`, and saves their index to `out`; returns the index.

  `backend` defaults to the checkpoint config's index.backend; `target_recall` (None = the
  config's index.target_recall) calibrates a ScaNN index on the split's captions. `out` must
  be absent or empty, or an index to replace when `overwrite` (checked first, and again before
  the save). Raises errors.UserError, FileNotFoundError or ValueError naming the flag at fault.
  """
  check_out(out, overwrite)
  if target_recall is not None and not 0 <= target_recall <= 1:
    raise ValueError(f"--target_recall: expected a recall in [0, 1]; found {target_recall}")
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
  backend = backend or (cfg.backend if cfg is not None else "auto")
  if target_recall is not None:  # a copy: the restored config may be locked or lack the fields
    cfg = ml_collections.ConfigDict(cfg.to_dict() if cfg is not None else {})
    cfg.update(target_recall=target_recall, leaves_to_search=0)
  queries = None
  if (indexes.resolve_backend(len(emb), backend, cfg) == "scann" and cfg is not None
      and cfg.get("target_recall") and not cfg.get("leaves_to_search")):
    queries = _calibration_queries(restored, data, cfg.get("calibration_queries") or 1000, config)
  idx = indexes.build(emb, backend, cfg, queries)
  if getattr(idx, "params", None) is not None and idx.params.calibration:
    c = idx.params.calibration
    log(f"ScaNN: {c['leaves_to_search']} of {idx.params.num_leaves} leaves reach recall@{c['k']} "
        f"{c['recall']:.3f} vs exact on {c['queries']} {c['source']} (target "
        f"{idx.params.target_recall}{'' if c['met'] else ', NOT met: every leaf is searched'})")
  identity = {"checkpoint": restored.path, "which": restored.description,
              "fingerprint": restored.fingerprint, "dim": int(emb.shape[1]),
              "dataset": config.dataset.name, "split": split, "num_images": int(num_images)}
  check_out(out, overwrite)  # again: embedding takes a while, and `out` may have changed
  try:
    indexes.save(idx, out, identity, {"image_ids": data.image_ids})
  except OSError as e:
    raise errors.UserError(f"--out {out!r}: cannot write the index ({e.strerror or e}); "
                           "nothing was written") from e
  log(f"wrote {idx.kind} index of {idx.size} x {idx.dim} to {out}")
  return idx


def _calibration_queries(restored, data, num: int, config):
  """BE embeddings [Q, H] of a seeded sample of the split's captions: queries of the kind the
  index serves (none of them is in the index, which holds images)."""
  rng = np.random.default_rng(np.random.SeedSequence([config.seed, 11]))
  rows = np.sort(rng.choice(data.num_texts, min(num, data.num_texts), replace=False))
  return restored.engine(config.eval.batch_size).embed_texts(
      data.token_ids[rows], data.text_mask[rows], desc="calibration queries")


def main(argv):
  del argv
  cli.quiet_library_logs()
  if not FLAGS.checkpoint or not FLAGS.out:
    cli.fail("--checkpoint (a training workdir) and --out (the index directory) are required")
  try:
    build_index(FLAGS.checkpoint, FLAGS.out, FLAGS.dataset, FLAGS.split, FLAGS.num_images,
                FLAGS.backend, target_recall=FLAGS.target_recall, overwrite=FLAGS.overwrite)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  cli.run(main, define_flags)
