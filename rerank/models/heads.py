"""Bi-encoder and cross-encoder heads on one encoder: the retrieval model of the paper.

- BE: text alone, or `[CLS]` + regions alone, through the encoder; the embedding is the masked
  mean over all valid positions (no projection), compared by cosine.
- CE: text and regions in one sequence; score = the "match" logit of a 2-way linear head
  (dropout first) on the tanh-pooled CLS output.
Whatever `model.dtype` the encoder computes in, the pooler, the CE head and the BE pooling run
in float32: bf16-rounded scores tie far more often (1,000 CE scores of random pairs, tiny
random model: 5 distinct values with a bf16 pooler and head, 999 in float32).
A joint model is ONE parameter tree used by both heads; a separate model is two trees,
`{"be": ..., "ce": ...}`; `rerank.models.modes` says which layout a mode uses and picks the tree
each head reads.
"""

import flax.linen as nn
import jax.numpy as jnp

from rerank.models import encoder as encoder_lib

class RetrievalModel(nn.Module):
  cfg: encoder_lib.EncoderConfig
  cls_token_id: int
  head_dropout: float = 0.1

  def setup(self):
    self.encoder = encoder_lib.Encoder(self.cfg)
    self.ce_dropout = nn.Dropout(self.head_dropout)
    self.ce_head = nn.Dense(
        2, dtype=jnp.float32, param_dtype=jnp.float32,  # float32 scores (module docstring)
        kernel_init=encoder_lib._init(0.02, ("embed", None)),
        bias_init=encoder_lib._zeros((None,)))

  def embed_text(self, token_ids, text_mask, deterministic: bool = True):
    """[B, T] token ids and mask -> [B, H] float32 embeddings."""
    hidden, mask, _ = self.encoder(token_ids, text_mask, deterministic=deterministic)
    return encoder_lib.masked_mean(hidden, mask)

  def embed_image(self, regions, region_mask, deterministic: bool = True):
    """[B, R, F+box] regions and [B, R] mask -> [B, H]; the input is `[CLS]` + regions."""
    b = regions.shape[0]
    cls = jnp.full((b, 1), self.cls_token_id, jnp.int32)
    hidden, mask, _ = self.encoder(cls, jnp.ones((b, 1), bool), regions, region_mask,
                                   deterministic=deterministic)
    return encoder_lib.masked_mean(hidden, mask)

  def score_pairs(self, token_ids, text_mask, regions, region_mask, deterministic: bool = True):
    """Pairs (text i, image i) -> [B, 2] float32 logits; column 1 is the match score."""
    _, _, pooled = self.encoder(token_ids, text_mask, regions, region_mask, deterministic=deterministic)
    logits = self.ce_head(self.ce_dropout(pooled.astype(jnp.float32), deterministic=deterministic))
    return logits.astype(jnp.float32)  # [B, 2]

  def __call__(self, token_ids, text_mask, regions, region_mask, deterministic: bool = True):
    """Touches every parameter (used by init): BE embeddings of both sides and CE logits."""
    return (self.embed_text(token_ids, text_mask, deterministic),
            self.embed_image(regions, region_mask, deterministic),
            self.score_pairs(token_ids, text_mask, regions, region_mask, deterministic))

