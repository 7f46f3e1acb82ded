"""Hard negatives mined by the current bi-encoder (ANCE-style), for the cross-encoder's pairs.

The authors' option: neighbours by the current BE, re-mined periodically; the CE then takes a
mined image as its negative with some probability. Training batches are a pure function of
the step, so we mine only for the captions of the next window of steps: every training image
is embedded, but only the window's captions, which keeps mining cheap on a CPU.
"""

import numpy as np

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
  negatives = mine_image_negatives(scorer, data, rows, config.hard_negatives.top)
  return dict(zip(rows.tolist(), negatives))
