"""BE-mined hard negatives (ANCE-style): nearest images by similarity, never the caption's own
image, harder than random ones, and the cross-encoder's training pairs take them."""

import numpy as np
import pytest

from configs import demo
from rerank import train
from rerank.data import batches
from rerank.training import mining


class _FakeScorer:
  """Embeds image row i as e_i and caption t as a vector closest to a chosen image set."""

  def __init__(self, img_emb, txt_emb):
    self.img_emb, self.txt_emb = img_emb, txt_emb

  def images(self, data, rows):
    return self.img_emb[rows]

  def texts(self, data, rows):
    return self.txt_emb[rows]


def _rows_as_features(rows):
  """Region features that name their image: [B, 2, 3] with every value = the image row."""
  rows = np.asarray(rows)
  return np.broadcast_to(rows[:, None, None], (len(rows), 2, 3)).astype(np.float32), np.ones(
      (len(rows), 2), bool)


def _data(n_img, per, token_len=2):
  cap_img = np.repeat(np.arange(n_img), per).astype(np.int32)
  t = len(cap_img)
  return batches.RetrievalData(
      token_ids=np.zeros((t, token_len), np.int32), text_mask=np.ones((t, token_len), bool),
      caption_image=cap_img, image_ids=np.arange(n_img) + 1000, region_features=_rows_as_features)


def _clustered_scorer(data, seed=0, centres=6, dim=16):
  """Unit image embeddings around a few centres; each caption a noisy copy of its image's."""
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
  c = rng.normal(size=(centres, dim))
  img = unit(c[rng.integers(0, centres, data.num_images)] + 0.4 * rng.normal(size=(data.num_images, dim)))
  txt = unit(img[data.caption_image] + 0.3 * rng.normal(size=(data.num_texts, dim)))
  return _FakeScorer(img, txt)


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


def _share_scoring_above(img_emb, txt_emb, data, mined: dict) -> float:
  """Mean over mined (caption, image) of the share of the caption's other images that score
  above the mined one by BE: ~0.5 for random images, near 0 for the hardest ones."""
  shares = []
  for row, negs in mined.items():
    sims = img_emb @ txt_emb[row]  # [N]
    others = sims[data.image_ids != data.image_ids[data.caption_image[row]]]
    shares += [np.mean(others > sims[n]) for n in negs]
  return float(np.mean(shares))


def _random_miner(data, rows, top, seed=0):
  """A stand-in miner that draws random other images: what the checks must tell apart."""
  rng = np.random.default_rng(seed)
  out = {}
  for r in rows:
    own = data.image_ids[data.caption_image[r]]
    out[r] = rng.choice(np.flatnonzero(data.image_ids != own), top)
  return out


@pytest.mark.parametrize("index", ["", "exact"])
def test_mined_negatives_are_harder_than_random_ones(index):
  data = _data(n_img=60, per=2)
  scorer = _clustered_scorer(data)
  config = demo.get_config("runlocal")
  config.batch_size = 16
  config.hard_negatives.update(top=5, index=index, temperature=0.0)
  mined = mining.mine_window(scorer, data, config, first_step=0, num_steps=2)
  assert len(mined) == 32 and all(len(n) == 5 for n in mined.values())
  for row, negs in mined.items():  # never the caption's own image
    assert (data.image_ids[negs] != data.image_ids[data.caption_image[row]]).all()
  hard = _share_scoring_above(scorer.img_emb, scorer.txt_emb, data, mined)
  rand = _share_scoring_above(scorer.img_emb, scorer.txt_emb, data,
                              _random_miner(data, list(mined), 5))
  # Top-5 of 59 others: at most 4 score above a mined image (share <= 0.07); random ~0.5.
  assert hard < 0.1, hard
  assert rand > 0.3, rand  # the margin a random miner fails
  # In cosine too: mined negatives score well above random ones on average.
  cos = lambda m: np.mean([scorer.txt_emb[r] @ scorer.img_emb[n].T for r, n in m.items()])  # noqa: E731
  assert cos(mined) - cos(_random_miner(data, list(mined), 5)) > 0.3


@pytest.mark.parametrize("lazy", [False, True])
def test_ce_batch_negatives_are_the_mined_images(lazy):
  data = _data(n_img=40, per=2)
  rows = batches.caption_rows(data.num_texts, 16, seed=0, step=3)
  rng = np.random.default_rng(1)
  mined = {int(r): rng.choice(np.flatnonzero(data.caption_image != data.caption_image[r]), 3,
                              replace=False) for r in rows}

  def negatives(hard_prob):
    b = batches.train_batch(data, ("be", "ce"), 16, 0, 3, mined, hard_prob,
                            num_be_negatives=2, lazy=lazy)
    assert b["ce"]["labels"].tolist() == [1] * 16 + [0] * 16
    ce_images = np.asarray(b["ce"]["regions"])[:, 0, 0].astype(int)  # [2B] image row of each pair
    np.testing.assert_array_equal(ce_images[:16], data.caption_image[rows])  # positives
    be_neg = np.asarray(b["be"]["neg_regions"])[:, 0, 0].astype(int).reshape(16, 2)
    return ce_images[16:], be_neg

  ce_neg, be_neg = negatives(hard_prob=1.0)
  for r, c, bn in zip(rows, ce_neg, be_neg):
    assert c in mined[int(r)], (r, c, mined[int(r)])  # the CE trains on a mined image
    assert set(bn.tolist()) <= set(mined[int(r)].tolist())  # and so does the BE's triplet loss
  # Without hard_prob the CE's negatives are random: most are not in the mined lists.
  ce_neg, _ = negatives(hard_prob=0.0)
  assert np.mean([c in mined[int(r)] for r, c in zip(rows, ce_neg)]) < 0.5


def test_training_mines_through_an_index_and_the_ce_trains_on_the_mined(tmp_path, monkeypatch):
  # The demo's tiny smoke run, mining through an exact index at steps 1 and 3; the CE takes a
  # mined image as every negative (ce_prob 1) and the BE 2 mined images per caption.
  config = demo.get_config("runlocal")
  config.update(total_steps=4, eval_every=0, checkpoint_every=4, log_every=2)
  config.hard_negatives.update(every=2, start=0, top=4, ce_prob=1.0, index="exact",
                               be_negatives=2, temperature=0.0)
  mined_calls, index_calls, batch_calls = [], [], []
  real_mine, real_index, real_batch = (mining.mine_window, mining.mine_with_index,
                                       batches.train_batch)

  def mine_window(scorer, data, cfg, first_step, num_steps):
    out = real_mine(scorer, data, cfg, first_step, num_steps)
    rows = np.array(sorted(out))
    # The current BE's view at mining time: how hard the mined images are, and random ones.
    img = scorer.images(data, np.arange(data.num_images))  # [N, H]
    txt = np.zeros((data.num_texts, img.shape[1]), np.float32)  # [T, H], the window's rows set
    txt[rows] = scorer.texts(data, rows)
    mined_calls.append((first_step, out, _share_scoring_above(img, txt, data, out),
                        _share_scoring_above(img, txt, data, _random_miner(data, rows, 4))))
    return out

  def mine_with_index(*args, **kwargs):
    index_calls.append(kwargs.get("backend", args[4] if len(args) > 4 else None))
    return real_index(*args, **kwargs)

  def train_batch(data, parts, batch_size, seed, step, mined=None, hard_prob=0.0, *args, **kw):
    out = real_batch(data, parts, batch_size, seed, step, mined, hard_prob, *args, **kw)
    batch_calls.append((data, step, mined, hard_prob, out))
    return out

  monkeypatch.setattr(train.mining, "mine_window", mine_window)
  monkeypatch.setattr(mining, "mine_with_index", mine_with_index)
  monkeypatch.setattr(train.batches, "train_batch", train_batch)
  assert train.train_and_evaluate(config, str(tmp_path / "w"), stop_after=3) is None  # no eval

  assert [c[0] for c in mined_calls] == [0, 2] and index_calls == ["exact", "exact"]
  for _, mined, hard, rand in mined_calls:
    assert len(mined) == 2 * config.batch_size  # the window's captions
    assert hard < 0.1 and rand > 0.3, (hard, rand)  # top 4 of 63 others, vs random ~0.5
  window = lambda step: mined_calls[step // 2][1]  # noqa: E731  (0-based step -> its mining)
  checked = set()
  for data, step, mined, hard_prob, out in batch_calls:
    assert hard_prob == 1.0 and any(mined is m for _, m, _, _ in mined_calls), step
    rows = batches.caption_rows(data.num_texts, config.batch_size, config.seed, step)
    if not set(rows.tolist()) <= set(mined):
      continue  # queued ahead with the previous window's negatives, dropped at re-mining
    assert mined is window(step), step
    b = len(rows)
    regions = np.asarray(out["ce"]["regions"])  # [2B, R, F]
    neg_regions = np.asarray(out["be"]["neg_regions"]).reshape((b, 2) + regions.shape[1:])
    for i, r in enumerate(rows):
      candidates = data.region_features(mined[int(r)])[0]  # [4, R, F] the mined images
      assert any(np.array_equal(regions[b + i], c) for c in candidates), (step, r)
      for neg in neg_regions[i]:
        assert any(np.array_equal(neg, c) for c in candidates), (step, r)
    checked.add(step)
  assert checked >= {0, 1, 2}  # every trained step's batch took its window's mined images
