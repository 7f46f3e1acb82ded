r"""Bi-encoder embeddings of texts or images from a converted checkpoint or a trained workdir.

  python -m rerank.encode --checkpoint=DIR --texts=FILE --out=FILE.npy
  python -m rerank.encode --checkpoint=DIR --images=FEATURES.npz --out=FILE.npy

Texts: one per line (UTF-8). Images: an `.npz` with `features` [N, R, F+box] float32 and
optionally `mask` [N, R] bool (or `num_regions` [N]); a bare `.npy` [N, R, F+box] means every
region is valid. Out: float32 [N, H], the masked mean over every valid output position (DESIGN
§1; not normalised unless --normalize). DIR is either `python -m rerank.convert`'s output or a
`python -m rerank.train` workdir (its best checkpoint, else the newest).

From Python: `emb = encode.load(DIR); emb.texts(["a dog"]); emb.images(regions, mask)`.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from rerank import cli
from rerank.data import datasets
from rerank.models import pretrained
from rerank.models import heads
from rerank.models import modes

_PROGRESS_MIN_BATCHES = 20  # fewer batches print no progress bar


class Embedder:
  """Jitted BE embeddings of one model; fixed batch shapes, so it compiles once per length bucket."""

  def __init__(self, model: heads.RetrievalModel, params, tokenizer, max_text_len: int,
               max_regions: int, batch_size: int = 64, description: str = ""):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_text_len, self.max_regions, self.batch_size = max_text_len, max_regions, batch_size
    self.description = description
    self.region_width = model.cfg.region_width
    self._text = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=model.embed_text))
    self._image = jax.jit(lambda p, r, m: model.apply({"params": p}, r, m, method=model.embed_image))

  def _batched(self, fn, arrays, desc):
    n = len(arrays[0])
    out = []
    batches = range(0, n, self.batch_size)
    bar = tqdm.tqdm(batches, desc=desc, unit="batch", file=sys.stderr,
                    disable=len(batches) < _PROGRESS_MIN_BATCHES)
    for start in bar:
      chunk = [a[start:start + self.batch_size] for a in arrays]
      size = len(chunk[0])
      # Pad the last batch by repeating row 0 so every call has one shape.
      chunk = [np.concatenate([c, np.repeat(c[:1], self.batch_size - size, 0)]) for c in chunk]
      out.append(np.asarray(fn(self.params, *chunk))[:size])
    h = self.model.cfg.hidden_size
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, h), np.float32)

  def texts(self, texts: list[str]) -> np.ndarray:
    """[N] strings -> [N, H] float32."""
    ids, mask = datasets.tokenize(self.tokenizer, list(texts), self.max_text_len)
    # Drop all-padding columns (rounded up to 8) to save compute; padding changes no output.
    width = min(self.max_text_len, -(-max(int(mask.sum(1).max(initial=1)), 1) // 8) * 8)
    return self._batched(self._text, (ids[:, :width], mask[:, :width]), "texts")

  def images(self, regions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[N, R, F+box] regions (+ [N, R] mask) -> [N, H] float32; the first max_regions are used."""
    regions = np.asarray(regions, np.float32)
    if regions.ndim != 3 or regions.shape[-1] != self.region_width:
      raise ValueError(f"regions: expected [N, R, {self.region_width}] (features + box); found "
                       f"{list(regions.shape)}")
    mask = np.ones(regions.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    regions, mask = regions[:, :self.max_regions], mask[:, :self.max_regions]
    return self._batched(self._image, (regions, mask), "images")


def _restore_workdir(path: str, batch_size: int):
  from rerank.inference import retriever  # pylint: disable=import-outside-toplevel
  try:
    m = retriever.load_model(path)
  except FileNotFoundError as e:
    raise ValueError(str(e)) from e
  params = modes.get(m.config.mode).be_params(m.params)
  return Embedder(m.model, params, m.tokenizer, m.config.max_text_len, m.config.max_regions,
                  batch_size, f"workdir {path}, {m.which} parameters")


def load(path: str, batch_size: int = 64, max_text_len: int | None = None, max_regions: int = 50) -> Embedder:
  """An Embedder for a converted checkpoint or a trained workdir. Raises ValueError if neither."""
  if pretrained.is_converted(path):
    meta = pretrained.read_meta(path)
    cfg = pretrained.encoder_config(meta)
    model = heads.RetrievalModel(cfg, cls_token_id=meta["cls_token_id"])
    params = {"encoder": jax.tree_util.tree_map(jnp.asarray, pretrained.load_encoder_params(path))}
    # DESIGN §2: 70 wordpieces + 2 specials (OSCAR); M3P allows 128 + 2. Both capped by the
    # checkpoint's positions (M3P's also count the [CLS] + regions of an image input).
    positions = cfg.max_position_embeddings - cfg.position_offset
    text_len = min(max_text_len or (130 if cfg.visual == "m3p" else 72), positions)
    regions = min(max_regions, positions - 1) if cfg.positions == "sequence" else max_regions
    return Embedder(model, params, pretrained.load_tokenizer(path), text_len, regions, batch_size,
                    f"converted {meta['family']} checkpoint {path}")
  if os.path.isfile(os.path.join(path, "config.json")) and any(
      os.path.isdir(os.path.join(path, d)) for d in ("checkpoints", "best")):
    return _restore_workdir(path, batch_size)
  raise ValueError(f"--checkpoint {path!r}: neither a converted checkpoint (model.json + params/) nor a "
                   "training workdir (config.json + checkpoints/ or best/)")


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


def _write_npy(path: str, array: np.ndarray) -> None:
  """Writes `path` atomically: a temporary file in the same directory, then a rename."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _define_flags() -> dict:
  """The CLI's flags, defined only when run as a script, so importing this module never clashes."""
  return dict(
      checkpoint=flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory or training "
                                     "workdir."),
      texts=flags.DEFINE_string("texts", None, "Text file, one text per line."),
      images=flags.DEFINE_string("images", None, "Region features: .npz (features [N,R,W], mask) or .npy."),
      out=flags.DEFINE_string("out", None, "Output .npy file: float32 [N, H]."),
      batch_size=flags.DEFINE_integer("batch_size", 64, "Inputs per forward pass."),
      max_text_len=flags.DEFINE_integer("max_text_len", 0, "Tokens per text incl. specials (0 = the "
                                        "checkpoint's training setting, or 72 / 130 for M3P)."),
      max_regions=flags.DEFINE_integer("max_regions", 50, "Regions per image (the first ones, as stored)."),
      normalize=flags.DEFINE_bool("normalize", False, "L2-normalise each embedding."),
  )


def main(argv, f):
  del argv
  cli.quiet_library_logs()
  v = {name: flag.value for name, flag in f.items()}
  if not v["checkpoint"] or not v["out"]:
    cli.fail("--checkpoint and --out are required")
  if bool(v["texts"]) == bool(v["images"]):
    cli.fail("pass exactly one of --texts=FILE or --images=FILE")
  source = v["texts"] or v["images"]
  if not os.path.isfile(source):
    cli.fail(f"{'--texts' if v['texts'] else '--images'} {source!r}: no such file")
  try:
    embedder = load(v["checkpoint"], v["batch_size"], v["max_text_len"] or None, v["max_regions"])
    emb = embedder.texts(read_texts(source)) if v["texts"] else embedder.images(*read_images(source))
  except (ValueError, OSError, KeyError) as e:
    cli.fail(str(e))
  if v["normalize"]:
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  try:
    _write_npy(v["out"], emb)
  except OSError as e:
    cli.fail(f"cannot write --out {v['out']!r}: {e}")
  print(f"wrote {v['out']}: {emb.shape[0]} x {emb.shape[1]} float32 ({embedder.description})")


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags), flags_parser=cli.parse_flags)
