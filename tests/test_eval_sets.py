"""Evaluation sets: COCO-style fold means and enlarged corpora with main-only queries."""

import ml_collections
import numpy as np
import pytest

from rerank.evaluation import evaluator
from rerank.data import batches
from rerank.data import eval_sets

H = 8  # embedding width of the stub scorer


def _data(emb_txt, emb_img, caption_image, ids, first_text=0):
  """RetrievalData whose token 0 / region 0 carry a row into the given embedding tables."""
  t = len(caption_image)
  return batches.RetrievalData(
      token_ids=np.stack([first_text + np.arange(t), np.zeros(t, int)], 1).astype(np.int32),
      text_mask=np.ones((t, 2), bool), caption_image=np.asarray(caption_image, np.int32),
      image_ids=np.asarray(ids, np.int64),
      region_features=lambda rows: (np.asarray(emb_img, np.float32)[np.asarray(rows)][:, None],
                                    np.ones((len(rows), 1), bool))), emb_txt


class _Scorer:
  """BE-only stand-in for evaluator.Scorer: embeddings come from tables, not a model."""

  def texts(self, data, rows):
    return self.table[data.token_ids[rows, 0]]

  def images(self, data, rows):
    return data.region_features(rows)[0][:, 0]


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cfg():
  return ml_collections.ConfigDict(dict(k=5, ce_queries_t2i=0, ce_queries_i2t=0,
                                        rr_queries_t2i=0, rr_queries_i2t=0))


def test_enlarged_corpus_queries_and_relevance_from_the_main_dataset_only():
  e = np.eye(H, dtype=np.float32)
  # main: 4 images, 2 captions each; caption embeddings near their image, caption row 0/1
  # (image 0) also near e[5]
  main_img = e[:4]
  main_txt = np.stack([_unit(e[0] + 0.5 * e[5])] * 2 + [e[i] for i in (1, 1, 2, 2, 3, 3)])
  main, _ = _data(main_txt, main_img, [0, 0, 1, 1, 2, 2, 3, 3], [10, 11, 12, 13])
  # distractors: an image that fits image 0's captions better than image 0 does, and a
  # caption that fits image 0 better than its own captions; ids clash with main on purpose
  dis_img = np.stack([_unit(e[0] + 0.5 * e[5]), e[6]])
  dis, _ = _data(None, dis_img, [0, 1], [10, 11], first_text=8)
  s = eval_sets.enlarge(main, dis)
  scorer = _Scorer()
  scorer.table = np.concatenate([main_txt, np.stack([e[0], e[6]])])  # rows 8, 9: distractors
  merged = s.data
  assert merged.num_images == 6 and merged.num_texts == 10
  assert len(set(merged.image_ids.tolist())) == 6  # distractor ids never equal a main id
  [row] = evaluator.evaluate(scorer, merged, "be", _cfg(), log=lambda *_: None,
                            query_texts=s.query_texts, query_images=s.query_images)
  assert row["queries"] == {"t2i": 8, "i2t": 4}
  # image 0's 2 captions lose R@1 to the distractor image; image 0 loses R@1 to the
  # distractor caption; everything else is found first
  assert row["t2i"]["R@1"] == pytest.approx(75.0) and row["t2i"]["R@5"] == 100.0
  assert row["i2t"]["R@1"] == pytest.approx(75.0) and row["i2t"]["R@5"] == 100.0
  # without distractors the same embeddings are perfect
  scorer.table = main_txt
  [clean] = evaluator.evaluate(scorer, main, "be", _cfg(), log=lambda *_: None)
  assert clean["t2i"]["R@1"] == 100.0 and clean["i2t"]["R@1"] == 100.0


def test_folds_partition_the_split_and_the_mean_is_per_fold():
  e = np.eye(H, dtype=np.float32)
  img = e[[0, 1, 2, 3, 4, 4]]  # images 4 and 5 look the same: only fold 1 has a confusion
  data, table = _data(img.repeat(2, 0), img, np.arange(6).repeat(2), np.arange(6) + 100)
  parts = eval_sets.folds(data, 2, 3)
  assert [p.num_images for p in parts] == [3, 3] and [p.num_texts for p in parts] == [6, 6]
  np.testing.assert_array_equal(parts[1].image_ids, [103, 104, 105])
  np.testing.assert_array_equal(parts[1].caption_image, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(parts[1].token_ids[:, 0], np.arange(6, 12))  # the fold's captions
  np.testing.assert_array_equal(parts[1].region_features([2])[0], img[[5]][:, None])
  scorer = _Scorer()
  scorer.table = table  # token 0 is the caption's row in the full split
  rows = [evaluator.evaluate(scorer, p, "be", _cfg(), log=lambda *_: None) for p in parts]
  assert rows[0][0]["t2i"]["R@1"] == 100.0 and rows[0][0]["i2t"]["R@1"] == 100.0
  # ties go against the relevant item: the captions of images 4 and 5 tie between the two and
  # miss R@1, and so do images 4 and 5 (each ties with the other's captions)
  assert rows[1][0]["t2i"]["R@1"] == pytest.approx(100 * 2 / 6)
  assert rows[1][0]["i2t"]["R@1"] == pytest.approx(100 * 1 / 3)
  assert rows[1][0]["ties"] == {"t2i": {"R@1": 4, "R@5": 0, "R@10": 0},
                                "i2t": {"R@1": 2, "R@5": 0, "R@10": 0}}
  [mean] = eval_sets.mean_rows(rows)
  assert mean["folds"] == 2 and mean["queries"] == {"t2i": 12, "i2t": 6}
  assert mean["t2i"]["R@1"] == pytest.approx((100 + 100 * 2 / 6) / 2)
  assert mean["mR"] == pytest.approx((rows[0][0]["mR"] + rows[1][0]["mR"]) / 2)
  with pytest.raises(ValueError, match="need 8 images; the split has 6"):
    eval_sets.folds(data, 2, 4)


def test_spec_strings_pick_single_split_fold_mean_or_enlarged():
  calls = []
  e = np.eye(H, dtype=np.float32)

  def load_split(config, split, tokenizer, num_images):
    calls.append((config.dataset.name, split))
    n = 4
    return _data(e[:n].repeat(1, 0), e[:n], np.arange(n), np.arange(n))[0], None

  cfg = ml_collections.ConfigDict(dict(dataset=dict(name="coco_oscar", data_dir="x")))
  sets, avg = eval_sets.from_spec(cfg, "test1k", None, load_split)
  assert not avg and [s.name for s in sets] == ["test1k"] and calls[-1] == ("coco_oscar", "test1k")
  sets, avg = eval_sets.from_spec(cfg, "test@2x2", None, load_split)
  assert avg and len(sets) == 2 and sets[1].data.num_images == 2
  sets, avg = eval_sets.from_spec(cfg, "test+cc_dev:dev+flickr30k_butd:test", None, load_split)
  assert calls[-2:] == [("cc_dev", "dev"), ("flickr30k_butd", "test")]
  assert sets[0].data.num_images == 12 and len(sets[0].query_images) == 4
  assert cfg.dataset.name == "coco_oscar"  # the caller's config is untouched
