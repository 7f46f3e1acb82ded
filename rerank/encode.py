r"""Bi-encoder embeddings of texts or images from a converted checkpoint or a trained workdir.

  python -m rerank.encode --checkpoint=DIR --texts=FILE --out=FILE.npy
  python -m rerank.encode --checkpoint=DIR --images=FEATURES.npz --out=FILE.npy

An existing --out is replaced only with --overwrite, and only when it is a .npy array file.

Texts: one per line (UTF-8). Images: an `.npz` with `features` [N, R, F+box] float32 and
optionally `mask` [N, R] bool (or `num_regions` [N]); a bare `.npy` [N, R, F+box] means every
region is valid. Out: float32 [N, H], the masked mean over every valid output position
(docs/DESIGN.md; not normalised unless --normalize). DIR is either `python -m rerank.convert`'s
output or a `python -m rerank.train` workdir (its best checkpoint, else the newest).

From Python (the engine this CLI runs on):

  from rerank.inference import engine, sharded
  m = engine.restore(DIR)                      # converted checkpoint or training workdir
  e = sharded.engine_for(m, 64, normalize=False)  # over every device (m.engine(): one device)
  e.embed_texts(*m.text_inputs(["a dog"]))     # [1, H]
  e.embed_images(*m.image_inputs(regions, mask))
"""

import os

from absl import flags
import numpy as np

from rerank import cli
from rerank import errors
from rerank.inference import engine
from rerank.inference import sharded

FLAGS = flags.FLAGS


def read_texts(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\r\n") for line in f]


def read_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(regions [N, R, W], mask [N, R] or None) from an .npz (`features`, `mask`/`num_regions`) or .npy."""
  if path.endswith(".npy"):
    return np.load(path, allow_pickle=False), None
  with np.load(path, allow_pickle=False) as z:
    if "features" not in z:
      raise ValueError(f"--images {path}: no `features` array (found {sorted(z.keys())})")
    feats = z["features"]
    if "mask" in z:
      return feats, z["mask"]
    if "num_regions" in z:
      return feats, np.arange(feats.shape[1])[None] < z["num_regions"][:, None]
    return feats, None


def check_out(path: str, overwrite: bool = False) -> None:
  """Raises UserError unless `path` is new, or a .npy array file and `overwrite`."""
  if not os.path.lexists(path):
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      raise errors.expected(f"--out {path!r}", "a file in an existing directory",
                            "no such directory")
    return
  if not os.path.isfile(path) or not _is_npy(path):
    kind = "a directory" if os.path.isdir(path) else "a file that is no .npy array"
    raise errors.expected(f"--out {path!r}", "a new .npy file", f"{kind}; choose another --out")
  if not overwrite:
    raise errors.expected(f"--out {path!r}", "a new .npy file", "an existing one; pass "
                          "--overwrite to replace it")


def _is_npy(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(6) == b"\x93NUMPY"


def _write_npy(path: str, array: np.ndarray) -> None:
  """Writes `path` atomically: a temporary file in the same directory, then a rename."""
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                     f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def define_flags():
  flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory or training workdir.")
  flags.DEFINE_string("texts", None, "Text file, one text per line.")
  flags.DEFINE_string("images", None, "Region features: .npz (features [N,R,W], mask) or .npy.")
  flags.DEFINE_string("out", None, "Output .npy file: float32 [N, H].")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out .npy file.")
  flags.DEFINE_integer("batch_size", 64, "Inputs per forward pass.")
  flags.DEFINE_integer("max_text_len", 0, "Tokens per text incl. specials (0 = the checkpoint's "
                       "training setting, or 72 / 130 for M3P).")
  flags.DEFINE_integer("max_regions", 50, "Regions per image (the first ones, as stored).")
  flags.DEFINE_bool("normalize", False, "L2-normalise each embedding.")


def encode(checkpoint: str, texts_path: str | None = None, images_path: str | None = None,
           batch_size: int = 64, max_text_len: int = 0, max_regions: int = 50,
           normalize: bool = False) -> tuple[np.ndarray, str]:
  """(float32 [N, H] BE embeddings of a text file or a region file, what embedded them).

  Raises ValueError (a path that is no checkpoint, bad region shapes), OSError or KeyError.
  """
  try:
    model = engine.restore(checkpoint, max_text_len=max_text_len or None, max_regions=max_regions)
  except FileNotFoundError as e:
    raise ValueError(str(e)) from e
  # Raw masked means, as documented; the batches split over every device.
  eng = sharded.engine_for(model, batch_size, normalize=False)
  if texts_path:
    emb = eng.embed_texts(*model.text_inputs(read_texts(texts_path)), desc="texts")
  else:
    emb = eng.embed_images(*model.image_inputs(*read_images(images_path)), desc="images")
  if normalize:
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  if model.config is not None:
    return emb, f"workdir {checkpoint}, {model.description} parameters"
  return emb, f"{model.description} {checkpoint}"


def main(argv):
  del argv
  cli.quiet_library_logs()
  if not FLAGS.checkpoint or not FLAGS.out:
    cli.fail("--checkpoint and --out are required")
  if bool(FLAGS.texts) == bool(FLAGS.images):
    cli.fail("pass exactly one of --texts=FILE or --images=FILE")
  source = FLAGS.texts or FLAGS.images
  if not os.path.isfile(source):
    cli.fail(f"{'--texts' if FLAGS.texts else '--images'} {source!r}: no such file")
  check_out(FLAGS.out, FLAGS.overwrite)
  try:
    emb, description = encode(FLAGS.checkpoint, FLAGS.texts, FLAGS.images, FLAGS.batch_size,
                              FLAGS.max_text_len, FLAGS.max_regions, FLAGS.normalize)
  except (ValueError, OSError, KeyError) as e:
    cli.fail(str(e))
  try:
    _write_npy(FLAGS.out, emb)
  except OSError as e:
    cli.fail(f"--out {FLAGS.out!r}: cannot write it ({e.strerror or e}); nothing was written")
  print(f"wrote {FLAGS.out}: {emb.shape[0]} x {emb.shape[1]} float32 ({description})")


if __name__ == "__main__":
  cli.run(main, define_flags)
