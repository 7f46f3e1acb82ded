"""BE-mined hard negatives: nearest images by similarity, never the caption's own image."""

import numpy as np

from rerank.training import mining
from rerank.data import batches


class _FakeScorer:
  """Embeds image row i as e_i and caption t as a vector closest to a chosen image set."""

  def __init__(self, img_emb, txt_emb):
    self.img_emb, self.txt_emb = img_emb, txt_emb

  def images(self, data, rows):
    return self.img_emb[rows]

  def texts(self, data, rows):
    return self.txt_emb[rows]


def test_mined_negatives_are_the_most_similar_other_images():
  rng = np.random.default_rng(0)
  n_img, n_txt, h = 30, 60, 8
  img = rng.normal(size=(n_img, h)).astype(np.float32)
  txt = rng.normal(size=(n_txt, h)).astype(np.float32)
  caption_image = rng.integers(0, n_img, n_txt).astype(np.int32)
  data = batches.RetrievalData(
      token_ids=np.zeros((n_txt, 2), np.int32), text_mask=np.ones((n_txt, 2), bool),
      caption_image=caption_image, image_ids=np.arange(n_img) + 1000, region_features=None)
  rows = np.array([0, 5, 17, 59])
  got = mining.mine_image_negatives(_FakeScorer(img, txt), data, rows, top=4, chunk=3)
  assert got.shape == (4, 4)
  for r, neg in zip(rows, got):
    sims = txt[r] @ img.T
    sims[caption_image[r]] = -np.inf
    assert set(neg.tolist()) == set(np.argsort(-sims)[:4].tolist())
    assert caption_image[r] not in neg
