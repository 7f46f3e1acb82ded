"""Hard negatives mined by the current bi-encoder (ANCE-style), for the cross-encoder's pairs.

The authors' option: neighbours by the current BE, re-mined periodically; the CE then takes a
mined image as its negative with some probability. Training batches are a pure function of
the step, so we mine only for the captions of the next window of steps: every training image
is embedded, but only the window's captions, which keeps mining cheap on a CPU.
With `config.hard_negatives.index` set, mining goes through an index (`rerank.indexing`:
exact, ScaNN, JAX top-k) and negatives are drawn with a temperature over the mined scores.

Model-agnostic: `scorer` is any object with `texts(data, rows)` and `images(data, rows)`
returning [len(rows), H] unit embeddings (the trainer passes a `DataScorer` over a
`rerank.inference.sharded.ShardedEngine`: the embedding is split over every device and process).
Through an index, each process indexes its share of the images and the per-share top-k merge.
"""

import jax
import numpy as np

from rerank.indexing import indexes as index_lib
from rerank.data import batches


def mine_image_negatives(scorer, data: batches.RetrievalData, caption_rows: np.ndarray,
                         top: int, chunk: int = 1024) -> np.ndarray:
  """[len(caption_rows), top] image rows most similar to each caption by BE, own image excluded."""
  img_emb = scorer.images(data, np.arange(data.num_images))  # [N, H]
  txt_emb = scorer.texts(data, caption_rows)  # [C, H]
  own = data.image_ids[data.caption_image[caption_rows]]  # [C]
  top = min(top, data.num_images - 1)
  out = []
  for a in range(0, len(caption_rows), chunk):  # chunks bound the [chunk, N] similarity block
    sims = txt_emb[a:a + chunk] @ img_emb.T
    sims[data.image_ids[None, :] == own[a:a + chunk, None]] = -np.inf
    out.append(np.argpartition(-sims, top - 1, axis=1)[:, :top])
  return np.concatenate(out) if out else np.zeros((0, top), np.int64)


def mine_window(scorer, data, config, first_step: int, num_steps: int) -> dict[int, np.ndarray]:
  """Caption row -> mined negatives, for every caption of steps [first_step, first_step + num_steps)."""
  rows = np.unique(np.concatenate([
      batches.caption_rows(data.num_texts, config.batch_size, config.seed, s)
      for s in range(first_step, first_step + num_steps)]))
  hn = config.hard_negatives
  if not hn.get("index"):
    negatives = mine_image_negatives(scorer, data, rows, hn.top)
    return dict(zip(rows.tolist(), negatives))
  # Through an index (config.hard_negatives.index = exact|scann|jax|auto): top-`top` minus
  # positives, then `top` draws at hn.temperature, so the CE sampler's uniform pick from a
  # caption's list follows the temperature distribution.
  ids, scores = mine_with_index(scorer, data, rows, hn.top, hn.index, config.get("index"))
  draws = sample_negatives(ids, scores, hn.top, hn.get("temperature", 0.0),
                           np.random.default_rng([config.seed, 2, first_step]))
  return {r: d for r, d, ok in zip(rows.tolist(), draws, (ids >= 0).any(1)) if ok}


# ------------------------------------------------------------------ through an index (ANCE-style)

def mine_with_index(scorer, data: batches.RetrievalData, caption_rows: np.ndarray, top: int,
                    backend: str = "auto", index_cfg=None):
  """The `top` nearest images of each caption through an index, its positives removed.

  Searches top + (most captions' positives) so that `top` remain after removing every image
  with the caption's image id (merged corpora may repeat an id).
  Returns:
    (ids [C, top] image rows, scores [C, top] cosines), best first; rows that run out of
    candidates (a tiny corpus) are padded with -1 / -inf.
  """
  img_emb = scorer.images(data, np.arange(data.num_images))  # [N, H]
  txt_emb = scorer.texts(data, caption_rows)  # [C, H]
  own = data.image_ids[data.caption_image[caption_rows]]  # [C]
  per_id = np.unique(data.image_ids, return_counts=True)[1].max()
  ids, scores = _search(img_emb, txt_emb, top + int(per_id), backend, index_cfg)
  positive = (ids < 0) | (data.image_ids[np.maximum(ids, 0)] == own[:, None])
  # Stable sort on "is positive" moves negatives first and keeps their search order.
  order = np.argsort(positive, axis=1, kind="stable")[:, :top]
  ids = np.where(np.take_along_axis(positive, order, 1), -1, np.take_along_axis(ids, order, 1))
  scores = np.where(ids < 0, -np.inf, np.take_along_axis(scores, order, 1))
  if ids.shape[1] < top:
    pad = top - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
  return ids, scores


def _search(corpus, queries, k: int, backend: str, index_cfg):
  """Each process indexes its share of the corpus; the per-share top-k are merged (the same
  answer on every process, ties to the lower row as one exact index)."""
  procs = jax.process_count()
  if len(corpus) < procs:  # too few rows to give every process some: one index each
    return index_lib.build(corpus, backend, index_cfg).search(queries, k)
  a, b = index_lib.shard_rows(len(corpus), procs, jax.process_index())
  return index_lib.search_multihost(index_lib.build(corpus[a:b], backend, index_cfg), a, queries, k)


def sample_negatives(ids: np.ndarray, scores: np.ndarray, num: int, temperature: float,
                     rng: np.random.Generator) -> np.ndarray:
  """[C, num] draws (with replacement) from each row's mined negatives, p ~ softmax(score / T).

  temperature <= 0 samples uniformly over the mined list (ANCE's uniform top-k); small
  temperatures favour the hardest negatives. Missing entries (-1) are never drawn unless a
  row has nothing else.
  """
  valid = ids >= 0
  valid[~valid.any(axis=1)] = True  # a row with nothing mined: draws -1, which callers drop
  if temperature > 0:
    logits = np.where(valid, np.where(np.isfinite(scores), scores, 0.0) / temperature, -np.inf)
  else:
    logits = np.where(valid, 0.0, -np.inf)
  logits = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=1, keepdims=True)
  c, top = ids.shape
  # One searchsorted for all rows: row r's CDF is shifted into [r, r + 1].
  cdf = np.cumsum(p, axis=1) / p.sum(axis=1, keepdims=True) + np.arange(c)[:, None]  # [C, top]
  u = rng.random((c, num)) + np.arange(c)[:, None]  # [C, num]
  pick = np.searchsorted(cdf.ravel(), u.ravel(), side="right").reshape(c, num)
  pick = np.clip(pick - np.arange(c)[:, None] * top, 0, top - 1)
  return np.take_along_axis(ids, pick, 1)
