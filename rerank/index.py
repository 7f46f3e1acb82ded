r"""Embeds a split's images, or a folder of photos, with a bi-encoder and saves their index.

  python -m rerank.index --checkpoint=WORKDIR [--dataset=NAME] [--split=test] --out=DIR \
      [--target_recall=0.95] [--overwrite]
  python -m rerank.index --checkpoint=DIR --images=PHOTOS/ --out=DIR [--image_cache=float16]

With --images, the corpus is every image file under PHOTOS (recursively, sorted; jpg, jpeg,
png, webp, bmp, gif, tif, tiff in any case; hidden files and folders left out), embedded by a
pixel family's model (ViLT, BLIP): a converted checkpoint (python -m rerank.convert
--family=vilt|blip) or a pixel training workdir. Files that cannot be decoded are skipped,
counted, named (the first few) and listed in DIR/skipped.tsv. The index keeps the files'
paths relative to PHOTOS, and PHOTOS itself (absolute), in DIR/image_files.npy and
index.json. A BLIP index also keeps the corpus's image states (ViT outputs, [N, P+1, Dv], in
--image_cache precision; rerank/inference/image_cache.py), so reranking never recomputes an
image. `build_folder_index(checkpoint, images, out, ...)` from Python.

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
import shutil
import sys
import tempfile

from absl import flags
import ml_collections
import numpy as np
import tqdm

from rerank import cli
from rerank import errors
from rerank.data import datasets
from rerank.data import image_folder
from rerank.data import images as images_lib
from rerank.indexing import indexes
from rerank.inference import engine
from rerank.inference import image_cache
from rerank.inference import sharded

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("checkpoint", None, "Training workdir whose bi-encoder embeds the corpus "
                      "(with --images also a converted vilt or blip checkpoint).")
  flags.DEFINE_string("dataset", None, "Dataset name (default: the checkpoint config's).")
  flags.DEFINE_string("split", "test", "Split whose images form the corpus.")
  flags.DEFINE_integer("num_images", 0, "Use only the first N images of the split (0 = all).")
  flags.DEFINE_string("out", None, "Directory to write the index to: absent or empty, or an index "
                      "to replace with --overwrite (replaced atomically).")
  flags.DEFINE_bool("overwrite", False, "Replace the index already in --out (never another kind "
                    "of directory).")
  flags.DEFINE_enum("backend", None, list(indexes.BACKENDS), "Override config.index.backend.")
  flags.DEFINE_string("images", None, "A folder of photos to index (recursively) instead of a "
                      "dataset split; needs a pixel-family (vilt, blip) --checkpoint.")
  flags.DEFINE_enum("image_cache", "float16", list(image_cache.DTYPES) + ["none"],
                    "--images with BLIP: store the corpus's image states in this precision, so "
                    "reranking runs the text side only (none: recompute them from the files).")
  flags.DEFINE_integer("batch_size", 0, "--images: images embedded per batch (default: the "
                       "config's eval.batch_size, 32 for a converted checkpoint).")
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


_SHOW_SKIPPED = 5  # unreadable files named in the log; DIR/skipped.tsv lists them all


def build_folder_index(checkpoint: str, images: str, out: str, backend: str | None = None,
                       overwrite: bool = False, batch_size: int = 0,
                       cache_dtype: str = "float16", log=print):
  """Embeds the image files under `images` with the pixel model `checkpoint` and saves their
  index to `out` (see the module docstring); returns the index.

  `cache_dtype` ("float16", "float32" or "none"): the precision of the stored image states
  when the model can rerank from them (BLIP); float32 reranks exactly as from the files.
  Raises errors.UserError naming the flag at fault.
  """
  check_out(out, overwrite)
  if cache_dtype not in image_cache.DTYPES + ("none",):
    raise errors.expected("--image_cache", f"one of {', '.join(image_cache.DTYPES)}, none",
                          repr(cache_dtype))
  files = image_folder.list_images(images)
  if not files:
    raise errors.expected(f"--images {images!r}", "image files (" +
                          ", ".join(e[1:] for e in image_folder.EXTENSIONS) + ")", "none")
  restored = _restore_pixel_model(checkpoint)
  spec = images_lib.ImageSpec.from_dict(restored.image, where=f"{checkpoint}: image")
  if not batch_size:
    batch_size = restored.config.eval.batch_size if restored.config is not None else 32
  cache = (cache_dtype != "none" and restored.mode.has_ce
           and image_cache.supports(restored.model))
  log(f"embedding {len(files)} image files under {images} with {restored.description} of "
      f"{restored.path}{', caching image states' if cache else ''}", flush=True)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.states.",
                             dir=parent)  # the states grow here, then are copied into the index
  try:
    emb, kept, bad, states = _embed_folder(restored, images, files, spec, batch_size,
                                           cache_dtype if cache else None, scratch)
    if not kept:
      raise errors.expected(f"--images {images!r}", "at least one readable image",
                            f"none of {len(files)} files ({_skipped_summary(bad)})")
    if bad:
      log(f"skipped {len(bad)} unreadable file(s) of {len(files)}: {_skipped_summary(bad)}; "
          f"all listed in {os.path.join(out, 'skipped.tsv')}")
    cfg = restored.config.get("index") if restored.config is not None else None
    idx = indexes.build(emb, backend or (cfg.backend if cfg is not None else "auto"), cfg)
    identity = {"checkpoint": restored.path, "which": restored.description,
                "fingerprint": restored.fingerprint, "dim": int(emb.shape[1]),
                "images": os.path.abspath(images), "num_files": len(files), "skipped": len(bad),
                "image_cache": cache_dtype if cache else None}
    arrays = {"image_files": np.asarray([files[r] for r in kept], dtype=str)}
    if cache:
      arrays["image_states"] = states[:len(kept)]  # [N, P+1, Dv]
    texts = {"skipped.tsv": "file\treason\n" + "".join(
        f"{f}\t{reason}\n" for f, reason in bad)} if bad else None
    check_out(out, overwrite)  # again: embedding takes a while, and `out` may have changed
    try:
      indexes.save(idx, out, identity, arrays, texts)
    except OSError as e:
      raise errors.UserError(f"--out {out!r}: cannot write the index ({e.strerror or e}); "
                             "nothing was written") from e
  finally:
    states = arrays = None  # the memmap must close before its file goes
    shutil.rmtree(scratch, ignore_errors=True)
  log(f"wrote {idx.kind} index of {idx.size} images x {idx.dim} to {out}")
  return idx


def _restore_pixel_model(checkpoint: str) -> engine.Restored:
  """A pixel family's converted checkpoint or training workdir with a bi-encoder."""
  try:
    restored = engine.restore(checkpoint)
  except (FileNotFoundError, KeyError) as e:
    raise ValueError(f"--checkpoint={checkpoint}: {e}") from e
  if restored.image is None:
    raise errors.expected(f"--checkpoint {checkpoint!r}", "a pixel-family model (vilt or blip) "
                          "to embed image files", f"{restored.description}, which reads region "
                          "features; index its dataset split without --images")
  if not restored.mode.has_be:
    raise errors.expected(f"--checkpoint {checkpoint!r}", "a model with a bi-encoder",
                          f"mode {restored.mode.name!r}")
  return restored


def _embed_folder(restored, root, files, spec, batch_size, cache_dtype, scratch):
  """(embeddings [n, E], kept file rows [n], bad [(file, reason)], states memmap or None).

  With `cache_dtype`, the image states of kept file j are row j of a memmap [len(files), P+1,
  Dv] in `scratch` (rows past n unused): one ViT pass gives states and embeddings.
  """
  encoder = (image_cache.StateEncoder(restored, batch_size) if cache_dtype
             else restored.engine(batch_size))
  emb, kept, bad, states = [], [], [], None
  bar = tqdm.tqdm(total=len(files), desc="images", unit="image", file=sys.stderr,
                  mininterval=2.0)
  for rows, pixels, mask, skipped in image_folder.batches(root, files, spec, batch_size):
    bad.extend(skipped)
    if len(rows):
      if cache_dtype:
        s, e = encoder(pixels, mask)  # [b, P+1, Dv], [b, E]
        if states is None:
          states = np.lib.format.open_memmap(os.path.join(scratch, "image_states.npy"), "w+",
                                             cache_dtype, (len(files),) + s.shape[1:])
        states[len(kept):len(kept) + len(rows)] = s
      else:
        e = encoder.embed_images(pixels, mask)
      emb.append(e)
      kept.extend(rows.tolist())
    bar.update(len(rows) + len(skipped))
  bar.close()
  emb = np.concatenate(emb) if emb else np.zeros((0, engine.embed_dim(restored.model)), np.float32)
  return emb, kept, bad, states


def _skipped_summary(bad) -> str:
  shown = "; ".join(f"{f} ({reason})" for f, reason in bad[:_SHOW_SKIPPED])
  return shown + (f"; and {len(bad) - _SHOW_SKIPPED} more" if len(bad) > _SHOW_SKIPPED else "")


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
  if FLAGS.images is not None:
    if FLAGS.dataset or FLAGS.num_images or FLAGS.target_recall is not None:
      cli.fail("--images: indexes a folder of photos; --dataset, --num_images and "
               "--target_recall apply to a dataset split only")
    if FLAGS.batch_size < 0:
      cli.fail(f"--batch_size: expected >= 1 (0 = the default); found {FLAGS.batch_size}")
    try:
      build_folder_index(FLAGS.checkpoint, FLAGS.images, FLAGS.out, FLAGS.backend,
                         FLAGS.overwrite, FLAGS.batch_size, FLAGS.image_cache)
    except (FileNotFoundError, ValueError) as e:
      cli.fail(str(e))
    return
  try:
    build_index(FLAGS.checkpoint, FLAGS.out, FLAGS.dataset, FLAGS.split, FLAGS.num_images,
                FLAGS.backend, target_recall=FLAGS.target_recall, overwrite=FLAGS.overwrite)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  cli.run(main, define_flags)
