"""BLIP's image-text retrieval model (HF `BlipForImageTextRetrieval`) as a pixel family.

Two towers and two heads (docs/DESIGN.md, "BLIP"):
- a ViT over the image: patch embedding, class token, learned positions, pre-LayerNorm
  blocks, a final LayerNorm; its outputs `image_states` [B, P+1, Dv] are what the index caches;
- a BERT text encoder (post-LayerNorm, no pooler) whose layers each hold a cross-attention
  block over the image states. The text-only pass skips that block; the image-grounded pass
  uses it. Both passes share the self-attention and feed-forward weights.
- BE = ITC: `vision_proj` / `text_proj` of the first position, L2-normalised ([B, embed_dim]).
- CE = ITM: `itm_head` (2-way) on the first position of the image-grounded text pass; column 1
  is the match logit. The token ids are used as given, as transformers does (the original BLIP
  code swaps the first token for an [ENC] token; transformers' forward does not).

`score_pairs(t, m, images, mask)` equals `score_pairs_from_states(t, m, image_states(images,
mask))`: a rerank query runs the text side only, over k cached images.
Parameters stay float32; `dtype` is the compute dtype; projections, normalisation and the ITM
head run in float32.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from rerank.models import encoder as encoder_lib
from rerank.models import pixels


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of both towers (text fields as in EncoderConfig, vision fields prefixed)."""

  vocab_size: int
  hidden_size: int = 768  # text
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  vision_hidden_size: int = 768
  vision_num_layers: int = 12
  vision_num_heads: int = 12
  vision_mlp_dim: int = 3072
  vision_layer_norm_eps: float = 1e-5
  vision_hidden_act: str = "gelu"
  image_size: int = 384  # square input side, in pixels
  patch_size: int = 16
  image_text_hidden_size: int = 256  # ITC embedding width
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                 "max_position_embeddings", "vision_hidden_size", "vision_num_layers",
                 "vision_num_heads", "vision_mlp_dim", "image_size", "patch_size",
                 "image_text_hidden_size"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"model.{name}: expected an integer >= 1; found {v!r}")
    for name in ("layer_norm_eps", "vision_layer_norm_eps"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ValueError(f"model.{name}: expected a number > 0; found {v!r}")
    for name in ("dropout_rate", "attention_dropout_rate"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
        raise ValueError(f"model.{name}: expected a number in [0, 1); found {v!r}")
    for name in ("hidden_act", "vision_hidden_act"):
      encoder_lib._activation(getattr(self, name))  # ValueError on an unknown name
    if self.dtype not in encoder_lib.DTYPES:
      raise ValueError(f"model.dtype: expected one of {sorted(encoder_lib.DTYPES)}; found {self.dtype!r}")
    if not isinstance(self.remat, bool):
      raise ValueError(f"model.remat: expected true or false; found {self.remat!r}")
    for width, heads in (("hidden_size", "num_heads"), ("vision_hidden_size", "vision_num_heads")):
      if getattr(self, width) % getattr(self, heads):
        raise ValueError(f"model.{width} ({getattr(self, width)}) must be a multiple of "
                         f"model.{heads} ({getattr(self, heads)})")
    if self.image_size % self.patch_size:
      raise ValueError(f"model.image_size ({self.image_size}) must be a multiple of "
                       f"model.patch_size ({self.patch_size})")

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    """A Config from its `dataclasses.asdict` form; ValueError naming an unknown or bad field."""
    if "vocab_size" not in d:
      raise ValueError("model.vocab_size: expected an integer >= 1; found nothing")
    return pixels.config_from_dict(cls, d, "BLIP")

  @property
  def embed_dim(self) -> int:
    """Width of the BE (ITC) embeddings."""
    return self.image_text_hidden_size

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def compute_dtype(self):
    return encoder_lib.DTYPES[self.dtype]


def example_images(cfg: Config, batch: int):
  """Zero images [batch, S, S, 3] float32 and an all-true mask [batch, S, S] (S = image_size)."""
  s = cfg.image_size
  return jnp.zeros((batch, s, s, 3), jnp.float32), jnp.ones((batch, s, s), bool)


def _dense(features, axes, dtype, name, axis=-1):
  """DenseGeneral with kernel axes `axes` (inputs then outputs); the bias takes the outputs'."""
  num_in = 1 if isinstance(axis, int) else len(axis)
  return nn.DenseGeneral(features, axis=axis, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=encoder_lib._init(0.02, axes),
                         bias_init=encoder_lib._zeros(axes[num_in:]), name=name)


def _layer_norm(eps, dtype, name):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=encoder_lib._ones(("embed",)), bias_init=encoder_lib._zeros(("embed",)),
                      name=name)


def _attend(q, k, v, mask, dropout, deterministic, dtype):
  """Scaled dot-product attention. q [B, Q, N, D], k/v [B, K, N, D], mask [B, K] or None."""
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)  # float32 softmax for bf16 stability
  probs = nn.Dropout(dropout)(probs, deterministic=deterministic)
  return jnp.einsum("bnqk,bknd->bqnd", probs, v)


# ------------------------------------------------------------------ vision tower (ViT)


class VisionLayer(nn.Module):
  """Pre-LayerNorm ViT block: x += Attn(LN(x)); x += MLP(LN(x)). Fused qkv as in BLIP."""

  cfg: Config

  @nn.compact
  def __call__(self, x, deterministic: bool):  # [B, S, Dv]
    cfg, dt = self.cfg, self.cfg.compute_dtype
    heads, head_dim = cfg.vision_num_heads, cfg.vision_hidden_size // cfg.vision_num_heads
    y = _layer_norm(cfg.vision_layer_norm_eps, dt, "layer_norm1")(x)
    qkv = _dense((3, heads, head_dim), ("embed", None, "heads", "kv"), dt, "qkv")(y)  # [B, S, 3, N, D]
    y = _attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, cfg.attention_dropout_rate,
                deterministic, dt)
    x = x + _dense(cfg.vision_hidden_size, ("heads", "kv", "embed"), dt, "projection", axis=(-2, -1))(y)
    y = _layer_norm(cfg.vision_layer_norm_eps, dt, "layer_norm2")(x)
    y = _dense(cfg.vision_mlp_dim, ("embed", "mlp"), dt, "fc1")(y)
    y = encoder_lib._activation(cfg.vision_hidden_act)(y)
    return x + _dense(cfg.vision_hidden_size, ("mlp", "embed"), dt, "fc2")(y)


class VisionTransformer(nn.Module):
  """Images [B, S, S, 3] (NHWC, normalised) -> post-LayerNorm states [B, P+1, Dv]."""

  cfg: Config

  @nn.compact
  def __call__(self, images, deterministic: bool):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    b, h, w, c = images.shape
    s, p = cfg.image_size, cfg.patch_size
    if (h, w, c) != (s, s, 3):
      raise ValueError(f"BLIP images: expected [B, {s}, {s}, 3] (model.image_size); found "
                       f"{list(images.shape)}")
    # Non-overlapping p x p patches, row-major over the grid: a stride-p convolution as a Dense.
    g = s // p
    patches = images.astype(dt).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)  # [B, g, g, p, p, 3]
    x = _dense(cfg.vision_hidden_size, (None, None, None, "embed"), dt, "patch_embedding",
               axis=(-3, -2, -1))(patches).reshape(b, g * g, -1)  # [B, P, Dv]
    cls = self.param("class_embedding", encoder_lib._init(0.02, (None, "embed")),
                     (1, cfg.vision_hidden_size), jnp.float32)
    pos = self.param("position_embedding", encoder_lib._init(0.02, (None, "embed")),
                     (cfg.num_patches + 1, cfg.vision_hidden_size), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt)[None], (b, 1, x.shape[-1])), x], axis=1)
    x = x + pos.astype(dt)[None]
    layer_cls = nn.remat(VisionLayer, static_argnums=(2,)) if cfg.remat else VisionLayer
    for i in range(cfg.vision_num_layers):
      x = layer_cls(cfg, name=f"layer_{i}")(x, deterministic)
    return _layer_norm(cfg.vision_layer_norm_eps, dt, "post_layernorm")(x)


# ------------------------------------------------------------------ text tower (BERT)


class TextAttention(nn.Module):
  """BERT attention block: LN(x + Dense(Attn(q=x, kv=context))). Self- or cross-attention."""

  cfg: Config

  @nn.compact
  def __call__(self, x, context, mask, deterministic: bool):  # x [B, L, H], context [B, K, Hc]
    cfg, dt = self.cfg, self.cfg.compute_dtype
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    proj = lambda name, y: _dense((heads, head_dim), ("embed", "heads", "kv"), dt, name)(y)  # noqa: E731
    y = _attend(proj("query", x), proj("key", context), proj("value", context), mask,
                cfg.attention_dropout_rate, deterministic, dt)
    y = _dense(cfg.hidden_size, ("heads", "kv", "embed"), dt, "output", axis=(-2, -1))(y)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return _layer_norm(cfg.layer_norm_eps, dt, "norm")(x + y)


class TextLayer(nn.Module):
  """Post-LayerNorm BERT layer with an optional cross-attention block over image states."""

  cfg: Config

  @nn.compact
  def __call__(self, x, mask, image_states, deterministic: bool):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    x = TextAttention(cfg, name="attention")(x, x, mask, deterministic)
    if image_states is not None:  # image-grounded (ITM) pass; every image position is real
      x = TextAttention(cfg, name="crossattention")(x, image_states.astype(dt), None, deterministic)
    y = _dense(cfg.mlp_dim, ("embed", "mlp"), dt, "intermediate")(x)
    y = _dense(cfg.hidden_size, ("mlp", "embed"), dt, "mlp_output")(encoder_lib._activation(cfg.hidden_act)(y))
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return _layer_norm(cfg.layer_norm_eps, dt, "output_norm")(x + y)


class TextEncoder(nn.Module):
  """Token ids [B, L] -> states [B, L, H]; with `image_states`, cross-attending to them."""

  cfg: Config

  @nn.compact
  def __call__(self, token_ids, text_mask, image_states=None, deterministic: bool = True):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    embed = lambda n, axes, name: nn.Embed(  # noqa: E731
        n, cfg.hidden_size, dtype=dt, param_dtype=jnp.float32,
        embedding_init=encoder_lib._init(0.02, axes), name=name)
    mask = text_mask.astype(bool)
    # Positions count valid tokens, so left- or right-padding gives the same states (equal to
    # transformers' 0..L-1 on right-padded input, the only layout its tokenizer produces).
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    x = (embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(token_ids)
         + embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(positions))
    x = _layer_norm(cfg.layer_norm_eps, dt, "embeddings_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    layer_cls = nn.remat(TextLayer, static_argnums=(4,)) if cfg.remat else TextLayer
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, name=f"layer_{i}")(x, mask, image_states, deterministic)
    return x


# ------------------------------------------------------------------ the retrieval model


def _normalize(x):  # [B, E] float32, as torch's F.normalize (eps 1e-12)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Model(nn.Module):
  """BLIP for retrieval: ITC embeddings (BE) and the ITM match logit (CE); module docstring."""

  cfg: Config
  head_dropout: float = 0.1  # before the ITM head while training (BLIP itself has none)

  def setup(self):
    cfg = self.cfg
    self.vision = VisionTransformer(cfg)
    self.text = TextEncoder(cfg)
    # Heads in float32 (scores and embeddings; see rerank/models/heads.py on bf16 ties).
    self.vision_proj = _dense(cfg.embed_dim, ("embed", None), jnp.float32, None)
    self.text_proj = _dense(cfg.embed_dim, ("embed", None), jnp.float32, None)
    self.itm_head = _dense(2, ("embed", None), jnp.float32, None)
    self.itm_dropout = nn.Dropout(self.head_dropout)

  def image_states(self, images, image_mask, deterministic: bool = True):
    """Images [B, S, S, 3] -> ViT outputs [B, P+1, Dv] in the compute dtype (what the index caches).

    `image_mask` is unused: BLIP resizes every image to the full square, so all pixels are real.
    """
    del image_mask
    return self.vision(images, deterministic)

  def embed_image_from_states(self, states):
    """ViT outputs [B, P+1, Dv] -> ITC image embeddings [B, E] float32, unit norm."""
    return _normalize(self.vision_proj(states[:, 0].astype(jnp.float32)))

  def embed_image(self, images, image_mask, deterministic: bool = True):
    """Images -> [B, E] float32 ITC embeddings."""
    return self.embed_image_from_states(self.image_states(images, image_mask, deterministic))

  def embed_text(self, token_ids, text_mask, deterministic: bool = True):
    """[B, L] token ids and mask -> [B, E] float32 ITC embeddings (text-only pass)."""
    states = self.text(token_ids, text_mask, None, deterministic)
    return _normalize(self.text_proj(states[:, 0].astype(jnp.float32)))

  def score_pairs_from_states(self, token_ids, text_mask, states, deterministic: bool = True):
    """Pairs (text i, cached ViT outputs i [B, P+1, Dv]) -> [B, 2] float32 ITM logits."""
    x = self.text(token_ids, text_mask, states, deterministic)[:, 0].astype(jnp.float32)
    return self.itm_head(self.itm_dropout(x, deterministic=deterministic))  # [B, 2]

  def score_pairs(self, token_ids, text_mask, images, image_mask, deterministic: bool = True):
    """Pairs (text i, image i) -> [B, 2] float32 logits; column 1 is the match score."""
    states = self.image_states(images, image_mask, deterministic)
    return self.score_pairs_from_states(token_ids, text_mask, states, deterministic)

  def __call__(self, token_ids, text_mask, images, image_mask, deterministic: bool = True):
    """Touches every parameter (used by init): both ITC embeddings and the ITM logits."""
    states = self.image_states(images, image_mask, deterministic)
    return (self.embed_text(token_ids, text_mask, deterministic),
            self.embed_image_from_states(states),
            self.score_pairs_from_states(token_ids, text_mask, states, deterministic))
