"""BLIP's image states, cached with an index: rerank without recomputing images.

BLIP's cross-encoder (ITM) runs the text encoder with cross-attention over the ViT's outputs;
the ViT does not see the text. So the corpus's ViT outputs ("image states", [N, P+1, Dv]) can
be computed once, when `python -m rerank.index --images=DIR` builds the index, and a reranked
query then runs only the text side over its k cached images (`rerank.bench` measures both).
ViLT mixes text and patches from its first layer on: it has nothing to cache.

A family supports the cache when its Model has `image_states(images, image_mask)` -> [B, P+1,
Dv], `embed_image_from_states(states)` -> [B, E] and `score_pairs_from_states(token_ids,
text_mask, states)` -> [B, 2] (rerank/models/blip.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from rerank.inference import engine

METHODS = ("image_states", "embed_image_from_states", "score_pairs_from_states")
DTYPES = ("float16", "float32")  # how the states are stored; float16 halves the disk


def supports(model) -> bool:
  """Whether `model`'s family can rerank from cached image states."""
  return all(callable(getattr(model, name, None)) for name in METHODS)


def pair_logits(model, params, token_ids, text_mask, states):
  """Pairs (text i, cached image states i [P+1, Dv]) -> [B, 2] CE logits, as `engine.pair_logits`."""
  return model.apply({"params": params}, token_ids, text_mask, states.astype(jnp.float32),
                     method=model.score_pairs_from_states)


class StateEncoder:
  """Images -> (their image states, their unit BE embeddings) in batches of `batch_size`.

  With one parameter tree for both encoders (joint modes, converted checkpoints) one ViT pass
  gives both; a `separate` model's BE has its own ViT, so its embeddings take a second pass.
  """

  def __init__(self, restored: engine.Restored, batch_size: int):
    model, mode = restored.model, restored.mode
    self.batch_size = batch_size
    self.be_params, self.ce_params = mode.be_params(restored.params), mode.ce_params(restored.params)
    self.shared = not mode.separate
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    states = lambda p, im, m: model.apply({"params": p}, im, m, method=model.image_states)  # noqa: E731

    def both(p, im, m):
      s = states(p, im, m)
      return s, unit(model.apply({"params": p}, s, method=model.embed_image_from_states))

    self._both = jax.jit(both)
    self._states = jax.jit(states)
    self._embed = jax.jit(lambda p, im, m: unit(engine.image_embeddings(model, p, im, m)))

  def __call__(self, images: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images [n, H, W, 3], mask [n, H, W] -> (states [n, P+1, Dv] f32, embeddings [n, E] f32)."""
    n, b = len(images), self.batch_size
    states, emb = [], []
    for a in range(0, n, b):
      im, m = (engine.pad_rows(x[a:a + b], b) for x in (images, mask))
      size = min(b, n - a)
      if self.shared:
        s, e = self._both(self.ce_params, im, m)
      else:
        s, e = self._states(self.ce_params, im, m), self._embed(self.be_params, im, m)
      states.append(np.asarray(s, np.float32)[:size])
      emb.append(np.asarray(e, np.float32)[:size])
    return np.concatenate(states), np.concatenate(emb)
