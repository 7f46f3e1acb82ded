"""Training losses for the bi-encoder (BE) and the cross-encoder (CE).

The BE learns a shared cosine space from in-batch contrast: VSE++ (hardest negative triplet,
the paper's default) or symmetric InfoNCE. A retrieval batch may hold several captions of the
same image, so "is a negative" is decided by image ids, never by row position: another caption
of the same image is not a negative of that image. The CE is a 2-way (no match / match)
classifier over (text, image) pairs, trained with softmax cross-entropy.

All functions are pure, jittable, and do their math in float32 even for bf16 activations, since
cosine margins of ~0.1 and temperatures of ~0.05 are too fine for bf16's 8-bit mantissa.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

# Added under the square root so an all-zero embedding normalises to 0 instead of NaN.
_NORM_EPS = 1e-12


def _l2_normalise(x: jax.Array) -> jax.Array:
  """Scales each row to unit L2 norm, in float32."""
  x = x.astype(jnp.float32)
  # rsqrt(|x|^2 + eps) stays smooth at 0, unlike x / max(|x|, eps) whose gradient jumps.
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _NORM_EPS)


def _cosine(txt_emb: jax.Array, img_emb: jax.Array) -> jax.Array:
  """Cosine similarity of every text with every image: [B, D] x [B, D] -> [B_txt, B_img]."""
  t = _l2_normalise(txt_emb)  # [B, D]
  v = _l2_normalise(img_emb)  # [B, D]
  return jnp.einsum("td,id->ti", t, v, precision=jax.lax.Precision.HIGHEST)  # [B, B]


def _negative_mask(txt_img_ids: jax.Array, img_ids: jax.Array) -> jax.Array:
  """True where (text t, image i) show different images, i.e. the pair is a true negative."""
  return txt_img_ids[:, None] != img_ids[None, :]  # [B_txt, B_img]


def vsepp_triplet_loss(txt_emb: jax.Array,
                       img_emb: jax.Array,
                       txt_img_ids: jax.Array,
                       img_ids: jax.Array,
                       margin: float = 0.1) -> jax.Array:
  """VSE++ max-of-hinges loss (Faghri et al., 2018) on cosine distance, both directions.

  Args:
    txt_emb: [B, D] text embeddings; row i is paired with row i of `img_emb`. Need not be unit.
    img_emb: [B, D] image embeddings.
    txt_img_ids: [B] int, the image id each caption describes.
    img_ids: [B] int, the id of each image row (equal to `txt_img_ids` in a plain BE batch).
    margin: hinge margin in cosine-distance units.

  Returns:
    Scalar float32: mean over the B positive pairs of the text->image and image->text hinges
    against the hardest in-batch negative. A row without any negative contributes 0.
  """
  dist = 1.0 - _cosine(txt_emb, img_emb)  # [B_txt, B_img]; dist[t, i] = d(text t, image i)
  pos = jnp.diagonal(dist)  # [B]
  neg = _negative_mask(txt_img_ids, img_ids)  # [B_txt, B_img]
  # Same-image pairs get +inf so the min only ever sees true negatives.
  masked = jnp.where(neg, dist, jnp.inf)  # [B_txt, B_img]
  hardest_img = jnp.min(masked, axis=1)  # [B] for each text, its closest wrong image
  hardest_txt = jnp.min(masked, axis=0)  # [B] for each image, its closest wrong caption
  # jnp.where rather than relu(-inf): keeps a batch of one image exactly 0 with zero gradient.
  t2i = jnp.where(jnp.any(neg, axis=1), jax.nn.relu(pos - hardest_img + margin), 0.0)
  i2t = jnp.where(jnp.any(neg, axis=0), jax.nn.relu(pos - hardest_txt + margin), 0.0)
  return jnp.mean(t2i + i2t)


def infonce_loss(txt_emb: jax.Array,
                 img_emb: jax.Array,
                 txt_img_ids: jax.Array,
                 img_ids: jax.Array,
                 temperature: float = 0.05) -> jax.Array:
  """Symmetric InfoNCE (CLIP-style) on cosine similarity / temperature.

  Only the diagonal is positive. Off-diagonal pairs of the same image are dropped from the
  softmax: calling them negatives would push apart a caption and its own image.

  Args:
    txt_emb: [B, D] text embeddings; row i is paired with row i of `img_emb`. Need not be unit.
    img_emb: [B, D] image embeddings.
    txt_img_ids: [B] int, the image id each caption describes.
    img_ids: [B] int, the id of each image row.
    temperature: softmax temperature.

  Returns:
    Scalar float32: mean of the text->image and image->text cross-entropies.
  """
  logits = _cosine(txt_emb, img_emb) / temperature  # [B_txt, B_img]
  b = logits.shape[0]
  keep = _negative_mask(txt_img_ids, img_ids) | jnp.eye(b, dtype=bool)  # [B_txt, B_img]
  logits = jnp.where(keep, logits, -jnp.inf)
  # The diagonal is never masked, so every softmax row has a finite entry.
  t2i = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))  # [B]
  i2t = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))  # [B]
  return 0.5 * (jnp.mean(t2i) + jnp.mean(i2t))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of the CE's match classifier.

  Args:
    logits: [N, 2] scores for (no match, match).
    labels: [N] int in {0, 1}; 1 means the text describes the image.

  Returns:
    Scalar float32 mean loss.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels.astype(jnp.int32))  # [N]
  return jnp.mean(losses)


def sampled_triplet_loss(txt_emb: jax.Array, img_emb: jax.Array, neg_emb: jax.Array,
                         margin: float = 0.1) -> jax.Array:
  """Triplet hinge of each caption against n sampled (e.g. mined) negative images, text->image.

  Args:
    txt_emb: [B, D] captions; img_emb: [B, D] their images; neg_emb: [B, n, D] negatives.
  Returns:
    Scalar: mean over the B * n triplets of relu(d(t, pos) - d(t, neg) + margin), d = 1 - cos.
  """
  t = _l2_normalise(txt_emb)  # [B, D]
  pos = jnp.sum(t * _l2_normalise(img_emb), -1)  # [B] cosine
  neg = jnp.einsum("bd,bnd->bn", t, _l2_normalise(neg_emb),
                   precision=jax.lax.Precision.HIGHEST)  # [B, n]
  return jnp.mean(jax.nn.relu(neg - pos[:, None] + margin))


def listwise_loss(scores: jax.Array) -> jax.Array:
  """Softmax cross-entropy over groups whose first candidate is the positive: [B, G] -> scalar."""
  logp = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
  return -jnp.mean(logp[:, 0])


def pair_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of pairs whose argmax class equals the label; a training-time sanity metric.

  Args:
    logits: [N, 2] scores for (no match, match).
    labels: [N] int in {0, 1}.

  Returns:
    Scalar float32 in [0, 1].
  """
  pred = jnp.argmax(logits, axis=-1)  # [N]
  return jnp.mean((pred == labels).astype(jnp.float32))


BE_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "vsepp": vsepp_triplet_loss,
    "infonce": infonce_loss,
}
