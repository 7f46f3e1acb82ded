"""ViLT (Kim et al., 2021) as a retrieval model: one Transformer over word pieces and image patches.

ViLT has no image backbone: an image is cut into patch_size x patch_size patches, each linearly
projected (a strided convolution), with a learned image `[CLS]` in front; text is embedded as
in BERT. Both get a modality-type embedding (0 text, 1 image) and go through pre-LayerNorm
Transformer blocks, a final LayerNorm and a tanh pooler on position 0 (docs/DESIGN.md, "ViLT").

- BE: text alone, or image `[CLS]` + patches alone; pooled by masked mean or by the first
  token's hidden state (`Config.pooling`).
- CE: `[text; image]` as one sequence; a 2-way head on the pooled output (column 1 = match).

Images are NHWC, padded bottom/right onto one canvas with a pixel mask (rerank.data.images).
The image position table (a square grid for `image_size`) is resized bilinearly to each
image's own patch grid, read off its mask; every patch of the canvas is kept and padding
patches are masked, so shapes are static and the model jits once per canvas. transformers'
ViltModel samples patches instead, which with its default `max_image_length=-1` keeps every
valid patch (in some order) and pads shorter images with masked ones: the same outputs at the
valid positions.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from rerank.models import encoder as encoder_lib
from rerank.models import pixels

POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of a ViLT model (ViLT-B/32 by default) and the canvas its images are padded onto."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position_embeddings: int = 40  # text positions; ViLT was pretrained on 40 word pieces
  type_vocab_size: int = 2  # BERT token types (text only uses type 0)
  modality_type_vocab_size: int = 2  # 0 text, 1 image
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  image_size: int = 384  # the position table covers (image_size / patch_size)^2 patches
  patch_size: int = 32
  max_image_height: int = 608  # the canvas (rerank.data.images.ImageSpec.canvas)
  max_image_width: int = 608
  pooling: str = "mean"  # BE pooling: "mean" (masked mean) or "cls" (first token)
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: bool = False
  dropout_rate: float = 0.0  # ViLT's own fine-tuning used no dropout
  attention_dropout_rate: float = 0.0

  # The encoder's building blocks (attention, LayerNorm, text embeddings) read these too.
  position_offset = 0

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                 "max_position_embeddings", "type_vocab_size", "modality_type_vocab_size",
                 "image_size", "patch_size", "max_image_height", "max_image_width"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{name}: expected an integer >= 1; found {value!r}")
    for name in ("dropout_rate", "attention_dropout_rate"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"model.{name}: expected a number in [0, 1); found {value!r}")
    if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
        or not self.layer_norm_eps > 0:
      raise ValueError(f"model.layer_norm_eps: expected a number > 0; found {self.layer_norm_eps!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model.hidden_size ({self.hidden_size}) must be a multiple of "
                       f"model.num_heads ({self.num_heads})")
    if self.pooling not in POOLINGS:
      raise ValueError(f"model.pooling: expected one of {', '.join(POOLINGS)}; found {self.pooling!r}")
    if self.dtype not in encoder_lib.DTYPES:
      raise ValueError(f"model.dtype: expected one of {sorted(encoder_lib.DTYPES)}; found {self.dtype!r}")
    encoder_lib._activation(self.hidden_act)  # pylint: disable=protected-access  (ValueError naming it)
    if self.patch_size > min(self.image_size, self.max_image_height, self.max_image_width):
      raise ValueError(f"model.patch_size ({self.patch_size}) must fit in model.image_size and "
                       f"the canvas ({self.max_image_height} x {self.max_image_width})")
    if not isinstance(self.remat, bool):
      raise ValueError(f"model.remat: expected true or false; found {self.remat!r}")

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    """A Config from its dict form; ValueError naming an unknown or bad field."""
    return pixels.config_from_dict(cls, d, "ViLT")

  @property
  def embed_dim(self) -> int:
    """Width of the BE embedding (no projection: the hidden size)."""
    return self.hidden_size

  @property
  def compute_dtype(self):
    return encoder_lib.DTYPES[self.dtype]

  @property
  def grid_size(self) -> int:
    """Side of the square grid the image position table was trained on."""
    return self.image_size // self.patch_size


def example_images(cfg: Config, batch: int):
  """Zero images [batch, H, W, 3] float32 on the model's canvas and an all-true mask [batch, H, W]."""
  shape = (batch, cfg.max_image_height, cfg.max_image_width)
  return jnp.zeros(shape + (3,), jnp.float32), jnp.ones(shape, bool)


def _resize_weights(valid, size: int, table: int):
  """Bilinear (align_corners) weights [B, size, table]: row i < valid[b] reads table positions.

  `valid` [B] int32 is each image's patch count along this axis (traced); rows past it are zero,
  as ViLT pads its resized position grid with zeros.
  """
  i = jnp.arange(size, dtype=jnp.float32)[None, :]  # [1, size]
  v = valid.astype(jnp.float32)[:, None]  # [B, 1]
  # align_corners: the first and last valid patch sit exactly on the table's corners.
  scale = jnp.where(v > 1, (table - 1) / jnp.maximum(v - 1, 1), 0.0)
  src = i * scale  # [B, size]
  lo = jnp.clip(jnp.floor(src), 0, table - 1)
  frac = src - lo
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, table - 1)
  w = ((1 - frac)[..., None] * jax.nn.one_hot(lo, table) + frac[..., None] * jax.nn.one_hot(hi, table))
  return jnp.where((i < v)[..., None], w, 0.0)


def patch_mask(image_mask, rows: int, cols: int):
  """[B, H, W] pixel mask -> [B, rows, cols] patch mask: the pixel each patch's grid point samples.

  Nearest-neighbour downsampling as ViLT does it (patch r reads pixel row floor(r * H / rows)):
  with H a multiple of the patch size that is the patch's top-left pixel.
  """
  image_mask = jnp.asarray(image_mask)  # a NumPy mask captured by jit cannot take traced indices
  h, w = image_mask.shape[1:]
  r = (jnp.arange(rows) * h) // rows
  c = (jnp.arange(cols) * w) // cols
  return image_mask[:, r][:, :, c].astype(bool)


class PatchEmbeddings(nn.Module):
  """Images -> image `[CLS]` + one token per patch, with resized position embeddings.

  Returns (tokens [B, 1 + rows * cols, H] in the compute dtype, mask [B, 1 + rows * cols] bool),
  patches in row-major order; before the modality embedding, as in ViLT.
  """

  cfg: Config

  @nn.compact
  def __call__(self, images, image_mask, deterministic: bool):
    cfg = self.cfg
    p, g, hid = cfg.patch_size, cfg.grid_size, cfg.hidden_size
    proj = nn.Conv(hid, (p, p), strides=(p, p), padding="VALID", dtype=cfg.compute_dtype,
                   param_dtype=jnp.float32, kernel_init=encoder_lib._init(0.02, (None, None, None, "embed")),
                   bias_init=encoder_lib._zeros(("embed",)), name="projection")
    x = proj(images.astype(cfg.compute_dtype))  # [B, rows, cols, H]; a partial last patch is dropped
    b, rows, cols = x.shape[:3]
    cls = self.param("cls_token", encoder_lib._init(0.02, ("embed",)), (hid,), jnp.float32)
    table = self.param("position_embeddings", encoder_lib._init(0.02, (None, "embed")),
                       (g * g + 1, hid), jnp.float32)
    mask = patch_mask(image_mask, rows, cols)  # [B, rows, cols]
    # Each image's patch grid spans its valid rows (down the first column) and valid columns
    # (along the first row): ViLT's images sit at the top-left of the canvas.
    ry = _resize_weights(mask[:, :, 0].sum(1), rows, g)  # [B, rows, g]
    rx = _resize_weights(mask[:, 0, :].sum(1), cols, g)  # [B, cols, g]
    grid = table[1:].reshape(g, g, hid)
    pos = jnp.einsum("biy,yxh,bjx->bijh", ry, grid, rx, precision=jax.lax.Precision.HIGHEST)
    x = (x + pos.astype(x.dtype)).reshape(b, rows * cols, hid)
    first = jnp.broadcast_to((cls + table[0]).astype(x.dtype), (b, 1, hid))
    x = nn.Dropout(cfg.dropout_rate)(jnp.concatenate([first, x], axis=1), deterministic=deterministic)
    return x, jnp.concatenate([jnp.ones((b, 1), bool), mask.reshape(b, rows * cols)], axis=1)


class Block(nn.Module):
  """A pre-LayerNorm Transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

  cfg: Config

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
    y = encoder_lib._layer_norm(cfg, "attention_norm")(x)
    x = x + drop(encoder_lib.SelfAttention(cfg, name="attention")(y, mask, deterministic))
    y = encoder_lib._layer_norm(cfg, "mlp_norm")(x)
    y = encoder_lib._dense(cfg.mlp_dim, ("embed", "mlp"), cfg, "intermediate")(y)
    y = encoder_lib._dense(cfg.hidden_size, ("mlp", "embed"), cfg, "mlp_output")(
        encoder_lib._activation(cfg.hidden_act)(y))
    return x + drop(y)


class Model(nn.Module):
  """ViLT with the BE and CE heads of the paper (see the module docstring)."""

  cfg: Config
  head_dropout: float = 0.1

  def setup(self):
    cfg = self.cfg
    self.text_embeddings = encoder_lib.TextEmbeddings(cfg)
    self.patch_embeddings = PatchEmbeddings(cfg)
    self.modality_embeddings = nn.Embed(
        cfg.modality_type_vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
        param_dtype=jnp.float32, embedding_init=encoder_lib._init(0.02, (None, "embed")))
    block = nn.remat(Block, static_argnums=(3,)) if cfg.remat else Block
    self.blocks = [block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = encoder_lib._layer_norm(cfg)
    # Pooler and head compute in float32 whatever the compute dtype (docs/DESIGN.md, section 1).
    self.pooler = encoder_lib._dense(cfg.hidden_size, ("embed", "mlp"), cfg, "pooler", dtype=jnp.float32)
    self.ce_dropout = nn.Dropout(self.head_dropout)
    self.ce_head = nn.Dense(2, dtype=jnp.float32, param_dtype=jnp.float32,
                            kernel_init=encoder_lib._init(0.02, ("embed", None)),
                            bias_init=encoder_lib._zeros((None,)))

  def _modality(self, type_id: int):  # [H]
    return self.modality_embeddings.embedding[type_id].astype(self.cfg.compute_dtype)

  def text_tokens(self, token_ids, text_mask, deterministic: bool = True):
    """[B, L] -> text tokens [B, L, H] and mask [B, L]: BERT embeddings + modality 0."""
    length = token_ids.shape[1]
    if length > self.cfg.max_position_embeddings:
      raise ValueError(f"ViLT text of {length} tokens: the model has "
                       f"{self.cfg.max_position_embeddings} text positions (max_text_len must fit)")
    positions = jnp.broadcast_to(jnp.arange(length), token_ids.shape)
    x = self.text_embeddings(token_ids, positions, deterministic)
    return x + self._modality(0), text_mask.astype(bool)

  def image_tokens(self, images, image_mask, deterministic: bool = True):
    """[B, H, W, 3] + [B, H, W] -> image tokens [B, 1 + N, H] and mask: patches + modality 1."""
    x, mask = self.patch_embeddings(images, image_mask, deterministic)
    return x + self._modality(1), mask

  def encode(self, token_ids=None, text_mask=None, images=None, image_mask=None,
             deterministic: bool = True):
    """Text, image or both (text first) through the blocks and the final LayerNorm.

    Returns (hidden [B, S, H], mask [B, S] bool); padded positions hold unspecified values.
    """
    parts = []
    if token_ids is not None:
      parts.append(self.text_tokens(token_ids, text_mask, deterministic))
    if images is not None:
      parts.append(self.image_tokens(images, image_mask, deterministic))
    if not parts:
      raise ValueError("ViLT needs text, images, or both")
    x = jnp.concatenate([p[0] for p in parts], axis=1)
    mask = jnp.concatenate([p[1] for p in parts], axis=1)
    for block in self.blocks:
      x = block(x, mask, deterministic)
    return self.final_norm(x), mask

  def pool(self, hidden):
    """ViLT's pooled output: tanh(dense(first token)), float32. [B, S, H] -> [B, H]."""
    return jnp.tanh(self.pooler(hidden[:, 0].astype(jnp.float32)))

  def _embed(self, hidden, mask):
    if self.cfg.pooling == "cls":
      return hidden[:, 0].astype(jnp.float32)
    return encoder_lib.masked_mean(hidden, mask)

  def embed_text(self, token_ids, text_mask, deterministic: bool = True):
    """[B, L] token ids and mask -> [B, H] float32 BE embeddings."""
    return self._embed(*self.encode(token_ids, text_mask, deterministic=deterministic))

  def embed_image(self, images, image_mask, deterministic: bool = True):
    """[B, H, W, 3] images and [B, H, W] mask -> [B, H] float32; the input is image `[CLS]` + patches."""
    return self._embed(*self.encode(images=images, image_mask=image_mask, deterministic=deterministic))

  def score_pairs(self, token_ids, text_mask, images, image_mask, deterministic: bool = True):
    """Pairs (text i, image i) -> [B, 2] float32 logits; column 1 is the match score."""
    hidden, _ = self.encode(token_ids, text_mask, images, image_mask, deterministic)
    pooled = self.ce_dropout(self.pool(hidden), deterministic=deterministic)
    return self.ce_head(pooled).astype(jnp.float32)

  def __call__(self, token_ids, text_mask, images, image_mask, deterministic: bool = True):
    """Touches every parameter (used by init): BE embeddings of both sides and CE logits."""
    return (self.embed_text(token_ids, text_mask, deterministic),
            self.embed_image(images, image_mask, deterministic),
            self.score_pairs(token_ids, text_mask, images, image_mask, deterministic))
