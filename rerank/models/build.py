"""The retrieval model a config describes, its example inputs and fresh parameters.

`build_model` reads `config.model` (or, with `config.init_from`, the converted checkpoint's
architecture); `init_params` lays parameters out as `config.mode` needs (one tree, or two for
`separate`); `with_pretrained_encoder` swaps a converted encoder into them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from rerank.models import encoder as encoder_lib
from rerank.models import heads
from rerank.models import modes
from rerank.models import pixels
from rerank.models import pretrained


# With `config.init_from`, these config.model fields still apply; the architecture (sizes, eps,
# activation, input layout) comes from the converted checkpoint.
_RUNTIME_FIELDS = ("dtype", "remat", "dropout_rate", "attention_dropout_rate")
# Pixel families also take these from config.model: no parameter depends on them (ViLT's BE
# pooling and image canvas).
_PIXEL_RUNTIME_FIELDS = ("pooling", "max_image_height", "max_image_width")


def build_model(config, cls_token_id: int, vocab_size: int):
  """The model `config` describes: a `heads.RetrievalModel`, or a pixel family's `Model`."""
  if pixels.is_pixel(config):
    return _build_pixel_model(config, vocab_size)
  fields = {k: v for k, v in config.model.to_dict().items() if k not in ("head_dropout", "family")}
  if config.get("init_from"):
    meta = pretrained.read_meta(config.init_from)
    runtime = {k: fields[k] for k in _RUNTIME_FIELDS if k in fields}
    cfg = pretrained.encoder_config(meta, **runtime)
    width = config.model.feature_dim + config.model.box_dim
    if cfg.region_width != width:
      raise ValueError(f"config.init_from {config.init_from!r}: the checkpoint embeds regions of "
                       f"{cfg.feature_dim}+{cfg.box_dim} values; config.model has {width}")
    longest = config.max_text_len + (config.max_regions if cfg.positions == "sequence" else 0)
    if longest + cfg.position_offset > cfg.max_position_embeddings:
      raise ValueError(f"config.max_text_len {config.max_text_len}: the checkpoint {config.init_from!r} has "
                       f"{cfg.max_position_embeddings} positions (offset {cfg.position_offset}); at most "
                       f"{cfg.max_position_embeddings - cfg.position_offset} tokens per sequence fit")
    cls_token_id = meta["cls_token_id"]
  else:
    cfg = encoder_lib.EncoderConfig(vocab_size=vocab_size, **fields)
  return heads.RetrievalModel(cfg, cls_token_id=cls_token_id,
                                  head_dropout=config.model.get("head_dropout", 0.1))


def _build_pixel_model(config, vocab_size: int):
  """A ViLT / BLIP model: sizes from config.model, or from config.init_from's model.json."""
  family = pixels.family_of(config)
  lib = pixels.module(family)
  fields = pixels.model_fields(config)
  if config.get("init_from"):
    meta = pretrained.read_meta(config.init_from)
    if meta.get("family") != family:
      raise ValueError(f"config.init_from {config.init_from!r}: expected a converted {family} checkpoint "
                       f"(config.model.family); found a {meta.get('family')} one")
    runtime = {k: fields[k] for k in _RUNTIME_FIELDS + _PIXEL_RUNTIME_FIELDS if k in fields}
    cfg = lib.Config.from_dict({**meta["model"], **runtime})
  else:
    cfg = lib.Config.from_dict({"vocab_size": vocab_size, **fields})
  return lib.Model(cfg, head_dropout=config.model.get("head_dropout", 0.1))


def with_pretrained_encoder(params, encoder_params, mode, whole: bool = False):
  """`params` with every encoder tree replaced by `encoder_params` (heads keep their init).

  `mode` is a `modes.Mode` or its name: a separate model has two encoders, both replaced.
  `whole`: `encoder_params` is the whole model tree, heads included (a converted pixel-family
  checkpoint), and replaces all of it.

  Raises ValueError naming the first parameter whose path or shape differs.
  """
  def swap(target):
    want = jax.tree_util.tree_flatten_with_path(target)[0]
    have = dict(jax.tree_util.tree_flatten_with_path(encoder_params)[0])
    if len(have) != len(want):
      raise ValueError(f"init_from: checkpoint has {len(have)} encoder tensors, the model {len(want)}")
    for path, leaf in want:
      if path not in have or tuple(have[path].shape) != tuple(leaf.shape):
        found = tuple(have[path].shape) if path in have else "nothing"
        raise ValueError(f"init_from: encoder{jax.tree_util.keystr(path)}: model expects "
                         f"{tuple(leaf.shape)}, checkpoint has {found}")
    return jax.tree_util.tree_map(lambda x, y: jnp.asarray(y, x.dtype), target, encoder_params)

  def replace(tree):
    return swap(tree) if whole else {**tree, "encoder": swap(tree["encoder"])}
  if modes.get(mode).separate:
    return {k: replace(v) for k, v in params.items()}
  return replace(params)


def dummy_inputs(config, batch: int = 1, model=None):
  """Zero inputs of the shapes `config` trains on (a pixel family needs its `model` for the canvas)."""
  if pixels.is_pixel(config):
    if model is None:
      raise ValueError("dummy_inputs: a pixel family needs the model (its image canvas)")
    images, mask = pixels.module(pixels.family_of(config)).example_images(model.cfg, batch)
    return (jnp.zeros((batch, config.max_text_len), jnp.int32),
            jnp.ones((batch, config.max_text_len), bool), images, mask)
  regions_width = config.model.feature_dim + config.model.box_dim
  return (jnp.zeros((batch, config.max_text_len), jnp.int32),
          jnp.ones((batch, config.max_text_len), bool),
          jnp.zeros((batch, config.max_regions, regions_width), jnp.float32),
          jnp.ones((batch, config.max_regions), bool))


def init_params(model, config, rng):
  """Fresh float32 parameters in the layout of `config.mode` (unboxed from logical metadata)."""
  init = lambda r: nn.unbox(model.init(r, *dummy_inputs(config, model=model))["params"])  # noqa: E731
  if modes.get(config.mode).separate:
    r_be, r_ce = jax.random.split(rng)
    return {"be": init(r_be), "ce": init(r_ce)}
  return init(rng)
