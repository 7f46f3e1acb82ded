"""Training batches: deterministic from (seed, step), epochs cover every caption, CE pairs valid."""

import numpy as np
import pytest

from rerank.data import batches


def _data(num_images=12, per_image=3):
  caption_image = np.repeat(np.arange(num_images), per_image).astype(np.int32)
  t = len(caption_image)

  def region_features(rows):
    rows = np.asarray(rows)
    regions = np.zeros((len(rows), 2, 5), np.float32) + rows[:, None, None]
    return regions, np.ones((len(rows), 2), bool)

  return batches.RetrievalData(
      token_ids=np.arange(t, dtype=np.int32)[:, None].repeat(4, 1), text_mask=np.ones((t, 4), bool),
      caption_image=caption_image, image_ids=np.arange(num_images, dtype=np.int64) + 100,
      region_features=region_features)


def test_caption_rows_cover_each_epoch_exactly_once_and_depend_on_seed():
  t, b = 36, 5
  rows = np.concatenate([batches.caption_rows(t, b, 7, s) for s in range(36)])  # 5 epochs
  for epoch in range(5):
    assert sorted(rows[epoch * t:(epoch + 1) * t].tolist()) == list(range(t))
  assert not np.array_equal(rows[:t], rows[t:2 * t])  # reshuffled per epoch
  again = np.concatenate([batches.caption_rows(t, b, 7, s) for s in range(36)])
  np.testing.assert_array_equal(rows, again)
  other = np.concatenate([batches.caption_rows(t, b, 8, s) for s in range(36)])
  assert not np.array_equal(rows, other)


def test_train_batch_is_a_pure_function_of_step():
  data = _data()
  a = batches.train_batch(data, ("be", "ce"), 6, 3, 11)
  _ = batches.train_batch(data, ("be", "ce"), 6, 3, 4)  # other calls in between change nothing
  b = batches.train_batch(data, ("be", "ce"), 6, 3, 11)
  for part in ("be", "ce"):
    for key in a[part]:
      np.testing.assert_array_equal(a[part][key], b[part][key])
  assert set(batches.train_batch(data, ("be",), 6, 3, 0)) == {"be"}
  assert set(batches.train_batch(data, ("ce",), 6, 3, 0)) == {"ce"}


def test_be_batch_pairs_captions_with_their_images():
  data = _data()
  be = batches.train_batch(data, ("be",), 8, 0, 2)["be"]
  caption = be["token_ids"][:, 0]
  np.testing.assert_array_equal(be["image_ids"], data.image_ids[data.caption_image[caption]])
  np.testing.assert_array_equal(be["regions"][:, 0, 0], data.caption_image[caption])


def test_ce_pairs_one_positive_one_negative_per_caption_half_image_half_caption_swaps():
  data = _data(num_images=40, per_image=5)
  n_img_swaps = n_txt_swaps = 0
  for step in range(40):
    ce = batches.train_batch(data, ("ce",), 16, 1, step)["ce"]
    b = 16
    assert ce["labels"].tolist() == [1] * b + [0] * b
    caption = ce["token_ids"][:, 0]
    image_row = ce["regions"][:, 0, 0].astype(int)
    match = data.caption_image[caption] == image_row
    assert match[:b].all() and not match[b:].any()
    pos_caption, neg_caption = caption[:b], caption[b:]
    pos_image, neg_image = image_row[:b], image_row[b:]
    swapped_image = (neg_caption == pos_caption) & (neg_image != pos_image)
    swapped_text = (neg_caption != pos_caption) & (neg_image == pos_image)
    assert (swapped_image ^ swapped_text).all()
    n_img_swaps += swapped_image.sum()
    n_txt_swaps += swapped_text.sum()
  frac = n_img_swaps / (n_img_swaps + n_txt_swaps)
  assert 0.42 < frac < 0.58, frac


def test_inconsistent_data_and_single_image_are_errors():
  good = _data()
  with pytest.raises(ValueError, match="one row per caption"):
    batches.RetrievalData(good.token_ids[:-1], good.text_mask[:-1], good.caption_image,
                          good.image_ids, good.region_features)
  with pytest.raises(ValueError, match="must index"):
    batches.RetrievalData(good.token_ids, good.text_mask, good.caption_image + 100,
                          good.image_ids, good.region_features)
  one = _data(num_images=1)
  with pytest.raises(ValueError, match="two distinct images"):
    batches.train_batch(one, ("ce",), 2, 0, 0)


def _with_confusers(data, k=2):
  n = data.num_images
  confusers = (np.arange(n)[:, None] + np.arange(1, k + 1)) % n  # rows i+1 .. i+k
  return batches.RetrievalData(data.token_ids, data.text_mask, data.caption_image, data.image_ids,
                               data.region_features, confusers=confusers)


def test_ce_negatives_from_confusers_when_asked():
  data = _with_confusers(_data())
  rows = np.arange(30)
  batch = batches.ce_batch(data, rows, np.random.default_rng(0), confuser_prob=1.0)
  neg_img = batch["regions"][30:, 0, 0].astype(int)  # the fake features hold the image row
  own = data.caption_image[rows]
  for o, n in zip(own, neg_img):
    assert n in data.confusers[o]
  np.testing.assert_array_equal(batch["token_ids"][30:], data.token_ids[rows])
  with pytest.raises(ValueError, match="known confusers"):
    batches.ce_batch(_data(), rows, np.random.default_rng(0), confuser_prob=0.5)


def test_ce_group_batch_positive_first_then_confusers_then_random_others():
  data = _with_confusers(_data(), k=2)
  rows = np.array([0, 5, 17, 35])
  g = 5
  batch = batches.ce_group_batch(data, rows, np.random.default_rng(1), group=g, num_confusers=2)
  cand = batch["regions"][:, 0, 0].astype(int).reshape(len(rows), g)  # [B, G] image rows
  np.testing.assert_array_equal(batch["token_ids"][:, 0].reshape(len(rows), g),
                                np.repeat(data.token_ids[rows, 0][:, None], g, 1))
  for b, r in enumerate(rows):
    own = data.caption_image[r]
    assert cand[b, 0] == own
    assert sorted(cand[b, 1:3]) == sorted(data.confusers[own])
    assert all(c != own for c in cand[b, 3:])
  with pytest.raises(ValueError, match="the dataset has 2"):
    batches.ce_group_batch(data, rows, np.random.default_rng(1), group=g, num_confusers=3)
  with pytest.raises(ValueError, match="group=1"):
    batches.ce_group_batch(data, rows, np.random.default_rng(1), group=1)


def test_be_negatives_come_from_mined_lists_else_random_other_images():
  data = _data()
  rows = np.array([0, 4, 20])
  mined = {0: np.array([7, 8]), 20: np.array([3])}
  negs = batches.be_negatives(data, rows, np.random.default_rng(0), 5, mined)
  assert negs.shape == (3, 5)
  assert set(negs[0]) <= {7, 8} and set(negs[2]) == {3}
  assert all(data.image_ids[n] != data.image_ids[data.caption_image[4]] for n in negs[1])
  batch = batches.train_batch(data, ("be",), 3, 0, 0, mined, num_be_negatives=5)["be"]
  assert batch["neg_regions"].shape == (15, 2, 5) and batch["neg_region_mask"].shape == (15, 2)
  assert "neg_regions" not in batches.train_batch(data, ("be",), 3, 0, 0)["be"]


def test_lazy_batch_equals_eager_and_reads_only_the_rows_asked_for():
  data = _data()
  read = []

  def region_features(rows):
    read.append(np.asarray(rows).copy())
    return data.region_features(rows)

  counted = batches.RetrievalData(data.token_ids, data.text_mask, data.caption_image,
                                  data.image_ids, region_features)
  eager = batches.train_batch(data, ("be", "ce"), 8, 3, 5, num_be_negatives=2)
  lazy = batches.train_batch(counted, ("be", "ce"), 8, 3, 5, num_be_negatives=2, lazy=True)
  read.clear()
  for part in ("be", "ce"):
    for key, value in eager[part].items():
      np.testing.assert_array_equal(np.asarray(lazy[part][key]), value)
      assert lazy[part][key].shape == value.shape
  read.clear()
  # A device holding rows 2..4 of the CE pairs reads those 2 images (regions and mask share them).
  half = lazy["ce"]["regions"][slice(2, 4), slice(None), slice(None)]
  np.testing.assert_array_equal(half, eager["ce"]["regions"][2:4])
  np.testing.assert_array_equal(lazy["ce"]["region_mask"][slice(2, 4), slice(None)],
                                eager["ce"]["region_mask"][2:4])
  assert [len(r) for r in read] == [2]
