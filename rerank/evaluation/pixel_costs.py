"""What reranking k photos costs per query, for the pixel families, with and without BLIP's cache.

BLIP's cross-encoder (ITM) reads the ViT's outputs, which do not depend on the query: a folder
index stores them (rerank/inference/image_cache.py) and an RR query runs only the text side
with cross-attention over its k candidates. ViLT mixes text and patches from its first layer
on, so every candidate costs a full forward pass. `rerank.bench --pixels=blip,vilt` runs
`measure` and prints `markdown`; per family and query (k candidates, one query), steady state
(every jitted shape called once before it is timed):

- `CE-k pixels`: the jitted rerank from the candidates' preprocessed pixels, in memory.
- `CE-k files`: the same plus decoding and preprocessing the k files again (JPEGs of
  `PHOTO_SIZE`), as `rerank.search` without a cache does.
- `CE-k cached` (BLIP): the jitted rerank from the cached states, read from a float16 `.npy`
  memmap as `rerank.search` reads them.
- `index s/image`: the index-time work per image (the ViT pass, and BLIP's states with it).
Also the cache's bytes per image, and how far its reranking scores are from recomputing them
(float32 states: rounding only; float16: the storage's precision).

Weights, token ids and pixels are random: the cost of a dense forward pass does not depend on
them. Sizes: "tiny" (2 layers of 64 on 64-pixel images: the tests), "small" (6 layers of 384 on 224-pixel images; quick on a CPU) or "base" (BLIP
ViT-B/16 at 384 with a BERT-base text side; ViLT-B/32 on its 608 x 608 canvas).
"""

import os
import tempfile

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from rerank.data import image_folder
from rerank.data import images as images_lib
from rerank.evaluation import paper_costs
from rerank.inference import image_cache
from rerank.inference import reranker as rerank_lib
from rerank.models import pixels

FAMILIES = ("blip", "vilt")
SIZES = ("tiny", "small", "base")
TEXT_LEN = 24  # query tokens incl. specials: a caption of about twenty words
VOCAB = 30522  # BERT's: both families' tokenizers
PHOTO_SIZE = (640, 480)  # width, height of the JPEGs read back by `CE-k files`

_MODELS = {  # family -> size -> Config fields (vocab_size added)
    "blip": {
        "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128, vision_hidden_size=64,
                     vision_num_layers=2, vision_num_heads=2, vision_mlp_dim=128, image_size=64,
                     patch_size=16, image_text_hidden_size=32),
        "small": dict(hidden_size=384, num_layers=6, num_heads=6, mlp_dim=1536,
                      vision_hidden_size=384, vision_num_layers=6, vision_num_heads=6,
                      vision_mlp_dim=1536, image_size=224, patch_size=16),
        "base": dict(image_size=384, patch_size=16),  # the Config's defaults: BLIP base
    },
    "vilt": {
        "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128, image_size=64,
                     patch_size=32, max_image_height=96, max_image_width=96),
        "small": dict(hidden_size=384, num_layers=6, num_heads=6, mlp_dim=1536, image_size=224,
                      patch_size=32, max_image_height=352, max_image_width=352),
        "base": dict(),  # ViLT-B/32, canvas 608 x 608 for 384-pixel shorter sides
    },
}
_SPECS = {
    ("blip", "tiny"): dict(kind="blip", size=64), ("vilt", "tiny"): dict(kind="vilt", size=64),
    ("blip", "small"): dict(kind="blip", size=224), ("blip", "base"): dict(kind="blip", size=384),
    ("vilt", "small"): dict(kind="vilt", size=224), ("vilt", "base"): dict(kind="vilt", size=384),
}


def _model(family: str, size: str):
  lib = pixels.module(family)
  cfg = lib.Config.from_dict(dict(_MODELS[family][size], vocab_size=VOCAB))
  spec = images_lib.ImageSpec.from_dict(_SPECS[(family, size)])
  if family == "vilt" and (cfg.max_image_height, cfg.max_image_width) != spec.canvas:
    raise ValueError(f"pixel bench: ViLT canvas {spec.canvas} != the model's")
  model = lib.Model(cfg, head_dropout=0.0)
  images, mask = lib.example_images(cfg, 1)
  ids = np.zeros((1, TEXT_LEN), np.int32)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids, ids > -1, images, mask)["params"])()
  return model, nn.unbox(params), spec


def _photos(root: str, k: int, seed: int) -> list[str]:
  """Writes k random JPEGs of PHOTO_SIZE under `root`; returns their names."""
  rng = np.random.default_rng(seed)
  files = []
  for i in range(k):
    pixels_ = rng.integers(0, 256, (PHOTO_SIZE[1] // 8, PHOTO_SIZE[0] // 8, 3), np.uint8)
    im = Image.fromarray(pixels_).resize(PHOTO_SIZE, Image.Resampling.BILINEAR)  # photo-like
    files.append(f"{i:03d}.jpg")
    im.save(os.path.join(root, files[-1]), quality=90)
  return files


def measure(families, size: str, k: int, seed: int = 0, log=print) -> list[dict]:
  """One row per family: seconds per query of each CE-k variant (see the module docstring)."""
  rows = []
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, VOCAB, (1, TEXT_LEN)).astype(np.int32)
  tok, tok_mask = np.repeat(ids[:, None], k, 1), np.ones((1, k, TEXT_LEN), bool)  # [1, k, L]
  be_ids, be = np.arange(k)[None], np.linspace(1, 0, k, dtype=np.float32)[None]
  with tempfile.TemporaryDirectory(prefix="rerank-pixel-bench-") as tmp:
    files = _photos(tmp, k, seed)
    for family in families:
      model, params, spec = _model(family, size)
      folder = image_folder.ImageFolder(tmp, files, spec)
      images, mask = folder.region_features(np.arange(k))  # [k, H, W, 3], [k, H, W]
      shape = lambda x: x.reshape((1, k) + x.shape[1:])  # noqa: E731
      rerank = rerank_lib.Reranker(model, k, query_block=1)
      from_pixels = lambda: rerank(params, lambda r, c: (tok, tok_mask, shape(images), shape(mask)),  # noqa: E731
                                   be_ids, be)["ce"]

      def from_files():
        ims, m = folder.region_features(np.arange(k))
        return rerank(params, lambda r, c: (tok, tok_mask, shape(ims), shape(m)), be_ids, be)["ce"]

      row = {"family": family, "size": size, "k": k, "image": list(spec.canvas),
             "ce_k_pixels": paper_costs.timed(from_pixels),
             "ce_k_files": paper_costs.timed(from_files)}
      embed = jax.jit(lambda p, im, m: model.apply({"params": p}, im, m, method=model.embed_image))
      row["index_seconds_per_image"] = paper_costs.timed(lambda: embed(params, images, mask)) / k
      if image_cache.supports(model):
        row.update(_cached(model, params, images, mask, tmp, k, tok, tok_mask, be_ids, be))
      rows.append(row)
      log(_line(row))
  return rows


def _cached(model, params, images, mask, tmp, k, tok, tok_mask, be_ids, be) -> dict:
  """BLIP: CE-k from float16 states read from a memmap, and the cache's score error."""
  states = np.asarray(jax.jit(lambda p, im, m: model.apply(
      {"params": p}, im, m, method=model.image_states))(params, images, mask), np.float32)
  path = os.path.join(tmp, "image_states.npy")
  np.save(path, states.astype(np.float16))
  cache = np.load(path, mmap_mode="r")  # [k, P+1, Dv]
  rerank = rerank_lib.Reranker(model, k, query_block=1, from_states=True)
  shape = lambda x: x.reshape((1, k) + x.shape[1:])  # noqa: E731
  no_mask = np.zeros((1, k, 0), bool)

  def from_cache(s=None):
    s = np.asarray(cache[np.arange(k)], np.float32) if s is None else s
    return rerank(params, lambda r, c: (tok, tok_mask, shape(s), no_mask), be_ids, be)["ce"]

  pixels_rerank = rerank_lib.Reranker(model, k, query_block=1)
  exact = pixels_rerank(params, lambda r, c: (tok, tok_mask, shape(images), shape(mask)),
                        be_ids, be)["ce"]
  return {"ce_k_cached": paper_costs.timed(from_cache),
          "cache_bytes_per_image": int(states[0].size * 2),
          "cache_max_abs_diff_float32": float(np.abs(from_cache(states) - exact).max()),
          "cache_max_abs_diff_float16": float(np.abs(from_cache() - exact).max())}


def _line(r: dict) -> str:
  ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
  cached = (f", cached {ms(r['ce_k_cached'])} ({r['ce_k_pixels'] / r['ce_k_cached']:.1f}x "
            f"faster than pixels; {r['cache_bytes_per_image'] / 2**20:.2f} MiB/image float16)"
            if "ce_k_cached" in r else ", nothing to cache")
  return (f"{r['family']} {r['size']} ({r['image'][0]}x{r['image'][1]}): CE-{r['k']} per query: "
          f"pixels {ms(r['ce_k_pixels'])}, files {ms(r['ce_k_files'])}{cached}; "
          f"indexing {ms(r['index_seconds_per_image'])}/image")


def markdown(rows: list[dict]) -> str:
  """The pixel families' table: seconds per query of CE-k, side by side."""
  if not rows:
    return ""
  k = rows[0]["k"]
  lines = [f"Pixel families, CE over k={k} candidates per query (seconds; random weights, "
           f"{TEXT_LEN}-token query, candidates' JPEGs {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}):", "",
           "| family | size | input | CE-k pixels | CE-k files | CE-k cached states | pixels / cached "
           "| cache MiB/image (fp16) | max abs score diff, fp32 / fp16 cache | index s/image |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "ce_k_cached" in r:
      cached, ratio = f"{r['ce_k_cached']:.2e}", f"{r['ce_k_pixels'] / r['ce_k_cached']:.1f}x"
      size = f"{r['cache_bytes_per_image'] / 2**20:.2f}"
      diff = f"{r['cache_max_abs_diff_float32']:.1e} / {r['cache_max_abs_diff_float16']:.1e}"
    else:
      cached, ratio, size, diff = "- (nothing to cache)", "-", "-", "-"
    lines.append(f"| {r['family']} | {r['size']} | {r['image'][0]}x{r['image'][1]} "
                 f"| {r['ce_k_pixels']:.2e} | {r['ce_k_files']:.2e} | {cached} | {ratio} | {size} "
                 f"| {diff} | {r['index_seconds_per_image']:.2e} |")
  return "\n".join(lines) + "\n"
