"""One configurable single-stream vision-language Transformer (OSCAR / M3P / UNITER families).

Text tokens and image regions share one post-LayerNorm BERT encoder. The same module serves
the bi-encoder (text alone, or `[CLS]` + regions alone) and the cross-encoder (text and
regions in one sequence). Every parameter carries logical axis names ("vocab", "embed",
"heads", "kv", "mlp", ...) so the sharding rules in a config decide how it is laid out on a
mesh; the model code never names a mesh axis.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Sizes and input layout of the encoder; read from our configs or a checkpoint's config."""

  vocab_size: int
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  hidden_act: str = "gelu"
  # Image input: 2048 detector features followed by `box_dim` box values per region.
  feature_dim: int = 2048
  box_dim: int = 6
  # "oscar": Linear(feature+box) [+ LayerNorm]; "m3p": LN(Linear(f) + Linear(loc5));
  # "uniter": LN(Linear(f)) + LN(Linear(box7)). See docs/DESIGN.md, section 1.
  visual: str = "oscar"
  visual_layernorm: bool = False
  # "text_first" (OSCAR, UNITER) or "image_first" (M3P).
  order: str = "text_first"
  # "text": positions count text tokens only (BERT, OSCAR, UNITER). "sequence": one position
  # embedding over the whole joint sequence, then one LayerNorm over it (M3P).
  positions: str = "text"
  # Added to every position id: HF RoBERTa / XLM-R count positions from padding_idx + 1.
  position_offset: int = 0
  # LayerNorm eps of the region embedding when the checkpoint says so (OSCAR's
  # img_layer_norm_eps); None = layer_norm_eps.
  visual_layer_norm_eps: float | None = None
  dtype: str = "float32"  # compute dtype; parameters always stay float32.
  remat: bool = False

  def __post_init__(self):
    if self.visual not in ("oscar", "m3p", "uniter"):
      raise ValueError(f"model.visual: expected one of oscar, m3p, uniter; found {self.visual!r}")
    if self.order not in ("text_first", "image_first"):
      raise ValueError(f"model.order: expected text_first or image_first; found {self.order!r}")
    if self.positions not in ("text", "sequence"):
      raise ValueError(f"model.positions: expected text or sequence; found {self.positions!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype: expected one of {sorted(DTYPES)}; found {self.dtype!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads ({self.num_heads})")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def region_width(self) -> int:
    """Values per region row: detector features, then box values."""
    return self.feature_dim + self.box_dim


def _init(std: float, axes: tuple[str, ...]):
  """BERT's truncated-normal(0.02) init, annotated with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(std), axes)


def _zeros(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _dense(features, axes, cfg: EncoderConfig, name: str, axis=-1, dtype=None):
  """DenseGeneral whose kernel axes are `axes` (inputs then outputs); the bias takes the outputs'.

  `dtype` overrides the compute dtype (the pooler computes in float32).
  """
  num_in = 1 if isinstance(axis, int) else len(axis)
  return nn.DenseGeneral(
      features, axis=axis, dtype=dtype or cfg.compute_dtype, param_dtype=jnp.float32,
      kernel_init=_init(0.02, axes), bias_init=_zeros(axes[num_in:]), name=name)


def _layer_norm(cfg: EncoderConfig, name: str | None = None, eps: float | None = None):
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps if eps is None else eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
      scale_init=_ones(("embed",)), bias_init=_zeros(("embed",)), name=name)


def _activation(name: str):
  # BERT's "gelu" is the exact erf form; "gelu_new" the tanh approximation.
  table = {"gelu": lambda x: nn.gelu(x, approximate=False),
           "gelu_new": lambda x: nn.gelu(x, approximate=True), "relu": nn.relu}
  if name not in table:
    raise ValueError(f"hidden_act: expected one of {sorted(table)}; found {name!r}")
  return table[name]


class TextEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout.

  `tokens` and `finish` split the work for layouts (M3P) whose positions and LayerNorm cover
  the joint text+image sequence; `__call__` is both at once (BERT, OSCAR, UNITER).
  """

  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    embed = lambda n, axes: nn.Embed(  # noqa: E731
        n, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        embedding_init=_init(0.02, axes))
    self.word_embeddings = embed(cfg.vocab_size, ("vocab", "embed"))
    self.position_embeddings = embed(cfg.max_position_embeddings, (None, "embed"))
    # M3P has no token types (type_vocab_size 0).
    self.token_type_embeddings = embed(cfg.type_vocab_size, (None, "embed")) if cfg.type_vocab_size else None
    self.LayerNorm = _layer_norm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def tokens(self, token_ids):  # [B, T] -> [B, T, H]: words (+ type 0), no position, no LayerNorm
    x = self.word_embeddings(token_ids)
    if self.token_type_embeddings is not None:
      x = x + self.token_type_embeddings(jnp.zeros_like(token_ids))
    return x

  def type_embedding(self, type_id: int):  # [H]: UNITER adds type 1 to its regions
    return self.token_type_embeddings.embedding[type_id].astype(self.cfg.compute_dtype)

  def finish(self, x, positions, deterministic: bool):  # + positions, LayerNorm, dropout
    x = x + self.position_embeddings(positions + self.cfg.position_offset)
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)

  def __call__(self, token_ids, positions, deterministic: bool):  # [B, T] -> [B, T, H]
    return self.finish(self.tokens(token_ids), positions, deterministic)


class RegionEmbeddings(nn.Module):
  """Projects detector regions (features + box) to the hidden size, per model family."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, regions, deterministic: bool, type_embedding=None):  # [B, R, F+box] -> [B, R, H]
    cfg = self.cfg
    h = cfg.hidden_size
    regions = regions.astype(cfg.compute_dtype)
    feats, box = regions[..., :cfg.feature_dim], regions[..., cfg.feature_dim:]
    if cfg.visual == "oscar":
      x = _dense(h, (None, "embed"), cfg, "img_embedding")(regions)
      if cfg.visual_layernorm:
        x = _layer_norm(cfg, "LayerNorm", cfg.visual_layer_norm_eps)(x)
    elif cfg.visual == "m3p":
      # loc = [x1, y1, x2, y2, area] from our 6 normalised box values.
      loc = jnp.concatenate([box[..., :4], box[..., 4:5] * box[..., 5:6]], axis=-1)
      x = _dense(h, (None, "embed"), cfg, "img_embedding")(feats)
      x = x + _dense(h, (None, "embed"), cfg, "loc_embedding")(loc)
      x = _layer_norm(cfg, "LayerNorm")(x)
    else:  # uniter: 7-d box [x1, y1, x2, y2, w, h, w*h].
      # UNITER: LN(LN(Linear(f)) + LN(Linear(box7)) + token_type_embeddings[1]).
      pos = jnp.concatenate([box[..., :6], box[..., 4:5] * box[..., 5:6]], axis=-1)
      x = _layer_norm(cfg, "img_layer_norm")(_dense(h, (None, "embed"), cfg, "img_linear")(feats))
      x = x + _layer_norm(cfg, "pos_layer_norm")(_dense(h, (None, "embed"), cfg, "pos_linear")(pos))
      if type_embedding is not None:
        x = x + type_embedding
      x = _layer_norm(cfg, "LayerNorm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):  # x [B, S, H], mask [B, S] bool
    cfg = self.cfg
    head_dim = cfg.hidden_size // cfg.num_heads
    proj = lambda name: _dense((cfg.num_heads, head_dim), ("embed", "heads", "kv"), cfg, name)  # noqa: E731
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # [B, S, N, D]
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    # Padding keys get -inf-like logits; softmax in float32 for bf16 stability.
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
    probs = nn.Dropout(cfg.attention_dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
    return _dense(cfg.hidden_size, ("heads", "kv", "embed"), cfg, "output", axis=(-2, -1))(out)


class Layer(nn.Module):
  """A post-LayerNorm BERT layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
    x = _layer_norm(cfg, "attention_norm")(x + drop(SelfAttention(cfg, name="attention")(x, mask, deterministic)))
    y = _dense(cfg.mlp_dim, ("embed", "mlp"), cfg, "intermediate")(x)
    y = _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "mlp_output")(_activation(cfg.hidden_act)(y))
    return _layer_norm(cfg, "output_norm")(x + drop(y))


class Encoder(nn.Module):
  """Embeds text and/or regions, runs the Transformer, returns hidden states and the pooled CLS.

  Returns (hidden [B, S, H], mask [B, S] bool, pooled [B, H]) where S = T + R (text first) or
  R + T (image first). Padded positions hold unspecified values; callers use `mask`.
  """

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, token_ids=None, text_mask=None, regions=None, region_mask=None, *,
               deterministic: bool = True):
    cfg = self.cfg
    # Positions count valid tokens only, so left- or right-padding gives the same output.
    count = lambda m: jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)  # noqa: E731
    joint = cfg.positions == "sequence"
    text_emb = TextEmbeddings(cfg, name="embeddings")
    parts, masks = [], []
    if token_ids is not None:
      parts.append(text_emb.tokens(token_ids) if joint else
                   text_emb(token_ids, count(text_mask), deterministic))
      masks.append(text_mask.astype(bool))
    if regions is not None:
      type_emb = text_emb.type_embedding(1) if cfg.visual == "uniter" and cfg.type_vocab_size > 1 else None
      parts.append(RegionEmbeddings(cfg, name="img_embeddings")(regions, deterministic, type_emb))
      masks.append(region_mask.astype(bool))
    if not parts:
      raise ValueError("Encoder needs text, regions, or both")
    if cfg.order == "image_first":
      parts, masks = parts[::-1], masks[::-1]
    x = jnp.concatenate(parts, axis=1)
    mask = jnp.concatenate(masks, axis=1)
    if joint:
      x = text_emb.finish(x, count(mask), deterministic)
    layer_cls = nn.remat(Layer, static_argnums=(3,)) if cfg.remat else Layer
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, name=f"layer_{i}")(x, mask, deterministic)
    # The pooler reads position 0: [CLS] when text comes first, the first region in M3P's
    # image-first layout (as M3P's own pooled output). It computes in float32 whatever the
    # compute dtype: bf16 CE scores take so few distinct values that rankings tie.
    pooled = jnp.tanh(_dense(cfg.hidden_size, ("embed", "mlp"), cfg, "pooler",
                             dtype=jnp.float32)(x[:, 0].astype(jnp.float32)))  # [B, H] float32
    return x, mask, pooled


def masked_mean(hidden, mask):
  """Mean over valid positions: the bi-encoder embedding. [B, S, H], [B, S] -> [B, H] float32."""
  m = mask.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)

