"""The one inference engine: restore a model, then jitted BE encoders and CE pair scoring.

Everything that runs a trained or converted model outside the training step goes through here
(evaluation, the `Retriever`, indexing, encoding, mining, export, the sibling report, the
benchmark), so restoring, padding and bucketing are written once:

- `restore(path)`: a training workdir (config.json + checkpoints/ or best/; the best
  checkpoint by default, the newest on request) or a converted checkpoint (model.json +
  params/) -> `Restored` (model, parameters, mode, tokenizer, config, which checkpoint).
- `Engine`: jitted `embed_texts` / `embed_images` / `score_pairs` over ARRAYS. Each batch is
  padded to `batch_size` rows by repeating row 0 and its text trimmed to the longest text
  rounded up to a multiple of 8, so a run compiles a handful of shapes. Parameters are jit
  arguments: `set_params` swaps weights without recompiling (the trainer's dev evaluation).
- `DataScorer`: the same three over rows of a `RetrievalData` (what evaluation and mining use).
`rerank.inference.sharded.ShardedEngine` is an `Engine` over a device mesh (every device of
every process, parameters laid out by the config's rules): evaluation, indexing, encoding and
mining run on it; `Engine` itself is the one-device case.
"""

import dataclasses
import functools
import hashlib
import json
import os
import sys
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from rerank import paths
from rerank.data import batches
from rerank.data import datasets
from rerank.models import build
from rerank.models import encoder as encoder_lib
from rerank.models import heads
from rerank.models import modes
from rerank.models import pixels
from rerank.models import pretrained
from rerank.training import checkpoints
from rerank.training import sharding
from rerank.training import steps

TEXT_BUCKET = 8  # text widths are rounded up to a multiple of this: few compiled shapes
_PROGRESS_MIN_ROWS = 20_000  # smaller jobs print no progress bar


# ------------------------------------------------------------------ restoring a model

def params_fingerprint(params) -> str:
  """A short hash of every parameter's path, shape and bytes: equal iff the weights are equal."""
  h = hashlib.blake2b(digest_size=8)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # sharded over hosts
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    arr = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class Restored:
  """A model with its parameters, ready for an `Engine`."""

  model: heads.RetrievalModel
  params: Any  # the whole tree ({"be", "ce"} trees for a `separate` model)
  mode: modes.Mode  # "be" for a converted checkpoint (an encoder, no CE head)
  tokenizer: Any  # tokenizers.Tokenizer
  config: ml_collections.ConfigDict | None  # the training config; None when converted
  description: str  # "best (step 400)", "latest (step 3)" or "converted bert checkpoint"
  path: str
  max_text_len: int  # tokens per text incl. specials
  max_regions: int  # regions per image
  mesh: Any = None  # the mesh `params` are laid out on (`restore_workdir(mesh=...)`), else None
  # A pixel family's preprocessing (`rerank.data.images.ImageSpec` as a dict); None for regions.
  image: dict | None = None

  @property
  def encoder_config(self) -> encoder_lib.EncoderConfig:
    return self.model.cfg

  @functools.cached_property
  def fingerprint(self) -> str:
    """Identifies the parameters (an index records the one that embedded its corpus)."""
    return params_fingerprint(self.params)

  def engine(self, batch_size: int | None = None, normalize: bool = True) -> "Engine":
    """An Engine on these parameters; batch_size defaults to config.eval.batch_size (else 64)."""
    if batch_size is None:
      batch_size = self.config.eval.batch_size if self.config is not None else 64
    return Engine(self.model, self.mode, batch_size, self.params, normalize)

  def text_inputs(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (token ids [N, max_text_len] int32, mask [N, max_text_len] bool)."""
    return datasets.tokenize(self.tokenizer, list(texts), self.max_text_len)

  def image_inputs(self, regions, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """[N, R, region_width] regions (+ [N, R] mask, default all valid) -> the first max_regions."""
    regions = np.asarray(regions, np.float32)
    width = self.encoder_config.region_width
    if regions.ndim != 3 or regions.shape[-1] != width:
      raise ValueError(f"regions: expected [N, R, {width}] (features + box); found "
                       f"{list(regions.shape)}")
    mask = np.ones(regions.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    return regions[:, :self.max_regions], mask[:, :self.max_regions]


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      os.path.isdir(os.path.join(path, d)) for d in ("checkpoints", "best"))


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training workdir was trained with (DIR/config.json); FileNotFoundError if none."""
  cfg_path = paths.join(workdir, "config.json")
  if not paths.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: not found; expected a training workdir "
                            "(python -m rerank.train ... --workdir=DIR)")
  return ml_collections.ConfigDict(json.loads(paths.read_text(cfg_path)))


def restore_workdir(workdir: str, latest: bool = False, config=None, mesh=None) -> Restored:
  """The best (else newest; `latest`: the newest) parameters of a training workdir.

  `config` (default DIR/config.json) must describe the run that wrote the checkpoints. With
  `mesh`, the parameters are restored straight into the layout config.rules give them there
  (an FSDP model is never whole on one device); without, whole on the default device.
  Raises FileNotFoundError (no config.json, no checkpoint) or ValueError (a checkpoint that
  does not fit the config).
  """
  workdir = os.fspath(paths.path(workdir))  # local (made absolute) or gs://
  if config is None:
    config = workdir_config(workdir)
  tokenizer = datasets.get_tokenizer(config)
  cls_id = tokenizer.token_to_id("[CLS]")  # None for XLM-R: build_model uses init_from's
  model = build.build_model(config, cls_id if cls_id is not None else 0, tokenizer.get_vocab_size())
  tx = steps.optimizer(config)
  make_state = functools.partial(steps.init_train_state, model, config, tx, jax.random.PRNGKey(0))
  abstract = jax.eval_shape(make_state)
  if mesh is not None:
    shardings = sharding.state_shardings(
        sharding.abstract_train_state(model, config, tx, make_state),
        sharding.rules_from_config(config, mesh), mesh)
    abstract = jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)
  with checkpoints.Checkpoints(workdir, keep=config.get("keep_checkpoints", 2)) as ckpts:
    try:
      params, which = ckpts.restore_params(abstract, prefer_best=not latest)
    except (ValueError, KeyError) as e:
      raise ValueError(f"checkpoint in {workdir!r} does not match its config (mode={config.mode}, "
                       f"model={config.model.hidden_size}x{config.model.num_layers}): {e}") from e
  if params is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint in checkpoints/ or best/; train first")
  return Restored(model, params, modes.get(config.mode), tokenizer, config, which, workdir,
                  config.max_text_len, config.max_regions, mesh,
                  image=config.image.to_dict() if pixels.is_pixel(config) else None)


def restore_converted(path: str, max_text_len: int | None = None, max_regions: int = 50) -> Restored:
  """A converted checkpoint's encoder (`python -m rerank.convert` / `rerank.export`) as a BE.

  A pixel family's checkpoint holds its heads too: with a match head (BLIP's ITM, ViLT's
  retrieval head) it is a BE and a CE on one tree, as a joint model.
  """
  meta = pretrained.read_meta(path)
  if meta.get("family") in pixels.FAMILIES:
    return _restore_pixel(path, meta, max_text_len)
  cfg = pretrained.encoder_config(meta)
  model = heads.RetrievalModel(cfg, cls_token_id=meta["cls_token_id"])
  params = {"encoder": jax.tree_util.tree_map(jnp.asarray, pretrained.load_encoder_params(path))}
  # docs/DESIGN.md: 70 wordpieces + 2 specials (OSCAR); M3P allows 128 + 2. Both capped by the
  # checkpoint's positions (M3P's also count the [CLS] + regions of an image input).
  positions = cfg.max_position_embeddings - cfg.position_offset
  text_len = min(max_text_len or (130 if cfg.visual == "m3p" else 72), positions)
  regions = min(max_regions, positions - 1) if cfg.positions == "sequence" else max_regions
  return Restored(model, params, modes.get("be"), datasets.load_tokenizer(path), None,
                  f"converted {meta['family']} checkpoint", os.path.abspath(path), text_len,
                  regions)


def _restore_pixel(path: str, meta: dict, max_text_len: int | None) -> Restored:
  lib = pixels.module(meta["family"])
  cfg = lib.Config.from_dict(meta["model"])
  params = jax.tree_util.tree_map(jnp.asarray, pretrained.load_encoder_params(path))
  mode = modes.get("joint_sum" if meta.get("has_ce_head") else "be")
  text_len = min(max_text_len or 40, cfg.max_position_embeddings)
  return Restored(lib.Model(cfg), params, mode, datasets.load_tokenizer(path), None,
                  f"converted {meta['family']} checkpoint", os.path.abspath(path), text_len, 0,
                  image=meta.get("image"))


def restore(path: str, latest: bool = False, max_text_len: int | None = None,
            max_regions: int = 50) -> Restored:
  """A converted checkpoint or a training workdir; ValueError if `path` is neither.

  `max_text_len` / `max_regions` apply to a converted checkpoint only (a workdir keeps its
  training config's); `latest` to a workdir only.
  """
  if pretrained.is_converted(path):
    return restore_converted(path, max_text_len, max_regions)
  if is_workdir(path):
    return restore_workdir(path, latest)
  raise ValueError(f"--checkpoint {path!r}: neither a converted checkpoint (model.json + params/) "
                   "nor a training workdir (config.json + checkpoints/ or best/)")


# ------------------------------------------------------------------ the model, applied

def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_embeddings(model, params, token_ids, text_mask):
  """[B, L] texts -> [B, H] BE embeddings (masked mean, not normalised)."""
  return model.apply({"params": params}, token_ids, text_mask, method=model.embed_text)


def image_embeddings(model, params, regions, region_mask):
  """[B, R, W] regions -> [B, H] BE embeddings of `[CLS]` + regions (not normalised)."""
  return model.apply({"params": params}, regions, region_mask, method=model.embed_image)


def pair_logits(model, params, token_ids, text_mask, regions, region_mask):
  """Pairs (text i, image i) -> [B, 2] CE logits; column 1 is the match score."""
  return model.apply({"params": params}, token_ids, text_mask, regions, region_mask,
                     method=model.score_pairs)


def embed_dim(model) -> int:
  """Width of the model's BE embeddings (BLIP projects them; region families do not)."""
  return getattr(model.cfg, "embed_dim", model.cfg.hidden_size)


def trim_text(token_ids: np.ndarray, text_mask: np.ndarray, multiple: int = TEXT_BUCKET):
  """Drops padding columns beyond the longest text (rounded up to `multiple`).

  Padding changes no output, and batches are often much shorter than max_text_len; a few
  length buckets bound the number of compiled shapes.
  """
  longest = max(int(text_mask.sum(axis=1).max()), 1) if len(text_mask) else 1
  width = min(-(-longest // multiple) * multiple, token_ids.shape[1])
  return token_ids[:, :width], text_mask[:, :width]


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to `size` by repeating row 0, so every jitted call sees one shape."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


class Engine:
  """Jitted BE encoders and CE pair scoring of one model, over arrays of any length.

  Inputs may be arrays or anything sliced lazily along axis 0 (`x[a:b]`, `x.shape`), such as
  `batches.region_leaves(..., lazy=True)`: only one batch of region features is read at a time.
  `normalize` returns unit embeddings, normalised inside jit (evaluation and search); without
  it, the raw masked means (`rerank.encode`).
  """

  def __init__(self, model: heads.RetrievalModel, mode, batch_size: int, params=None,
               normalize: bool = True):
    self.model, self.mode, self.batch_size = model, modes.get(mode), batch_size
    self.be_params = self.ce_params = None
    post = _unit if normalize else (lambda x: x)
    self._text = jax.jit(lambda p, t, m: post(text_embeddings(model, p, t, m)))
    self._image = jax.jit(lambda p, r, m: post(image_embeddings(model, p, r, m)))
    self._pairs = jax.jit(lambda p, t, tm, r, rm: pair_logits(model, p, t, tm, r, rm)[:, 1])
    if params is not None:
      self.set_params(params)

  def set_params(self, params) -> "Engine":
    """Uses `params` (the mode's whole tree) from now on; nothing recompiles."""
    self.be_params = self.mode.be_params(params) if self.mode.has_be else None
    self.ce_params = self.mode.ce_params(params) if self.mode.has_ce else None
    return self

  def embed_texts(self, token_ids, text_mask, desc: str | None = None) -> np.ndarray:
    """[N, L] token ids and mask -> [N, H] float32 BE embeddings."""
    return self._map(self._text, "BE", (token_ids, text_mask), desc)

  def embed_images(self, regions, region_mask, desc: str | None = None) -> np.ndarray:
    """[N, R, W] regions and [N, R] mask -> [N, H] float32 BE embeddings."""
    return self._map(self._image, "BE", (regions, region_mask), desc, has_text=False)

  def score_pairs(self, token_ids, text_mask, regions, region_mask,
                  desc: str | None = None) -> np.ndarray:
    """Pairs (text i, image i) -> [N] float32 CE match logits."""
    return self._map(self._pairs, "CE", (token_ids, text_mask, regions, region_mask), desc)

  def _map(self, fn, part: str, arrays, desc, has_text: bool = True) -> np.ndarray:
    """fn(params, *batch) over batches of `arrays`: trimmed, padded, outputs concatenated."""
    params = self.be_params if part == "BE" else self.ce_params
    if params is None:
      raise ValueError(f"mode {self.mode.name!r} has no {part}, or set_params was never called")
    n, b = arrays[0].shape[0], self.batch_size
    out = []
    bar = tqdm.tqdm(total=n, desc=desc, unit="row", file=sys.stderr, mininterval=2.0,
                    disable=desc is None or n < _PROGRESS_MIN_ROWS)
    for start in range(0, n, b):
      chunk = [np.asarray(a[start:start + b]) for a in arrays]
      if has_text:
        chunk[:2] = trim_text(*chunk[:2])
      size = len(chunk[0])
      out.append(np.asarray(fn(params, *[pad_rows(c, b) for c in chunk]))[:size])
      bar.update(size)
    bar.close()
    if not out:
      return np.zeros((0, embed_dim(self.model)) if part == "BE" else (0,), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


# ------------------------------------------------------------------ over a dataset's rows

def text_rows(data: batches.RetrievalData, rows):
  """(token ids, mask) of caption rows, gathered one batch at a time (CE-full pair lists are
  far longer than the captions)."""
  rows = np.asarray(rows, np.int64)
  return tuple(batches.LazyRows(rows, lambda r, x=x: x[r], x.shape[1:], x.dtype)
               for x in (data.token_ids, data.text_mask))


def image_rows(data: batches.RetrievalData, rows):
  """(regions, mask) of image rows, read one batch at a time."""
  rows = np.asarray(rows, np.int64)
  if not len(rows):  # nothing to read (and no row to probe the shapes with)
    return np.zeros((0,)), np.zeros((0,))
  return batches.region_leaves(data, rows, lazy=True)


class DataScorer:
  """An Engine over rows of a `RetrievalData`: the duck-typed scorer that evaluation, mining
  and the sibling report take (`texts`, `images`, `pairs`)."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def set_params(self, params) -> "DataScorer":
    self.engine.set_params(params)
    return self

  def texts(self, data, rows) -> np.ndarray:  # [len(rows), H]
    return self.engine.embed_texts(*text_rows(data, rows))

  def images(self, data, rows) -> np.ndarray:  # [len(rows), H]
    return self.engine.embed_images(*image_rows(data, rows))

  def pairs(self, data, texts, images, desc=None) -> np.ndarray:  # [P] match logits
    """CE match logits of (caption texts[i], image images[i])."""
    return self.engine.score_pairs(*text_rows(data, texts), *image_rows(data, images), desc=desc)
