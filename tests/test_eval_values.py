"""Recall values of the BE, CE and RR rows, both directions, against a scorer whose right
answers are known by construction; and eval.fusion / eval.fusion_weight from a config file
reaching the RR order.

The stub scorer reads its scores from pictures (one row per caption, one column per image):
the BE score of (caption t, image n) is row t of a BE table dotted with the one-hot of image n,
the CE score a CE table's entry. A query's rank is then a count of symbols in its row (t2i)
or column (i2t), so every expected recall below is a count anyone can redo by eye.
"""

import os
import sys

import ml_collections
import numpy as np
import pytest

from rerank.data import batches
from rerank.data import datasets
from rerank.evaluation import evaluator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs.paper import flickr30k_fusion_standard  # noqa: E402
from configs.paper import flickr30k_fusion_w01  # noqa: E402
from configs.paper import flickr30k_fusion_w09  # noqa: E402

QUIET = dict(log=lambda *_: None)


class _TableScorer:
  """The duck-typed scorer `evaluator.evaluate` takes, reading scores from tables by row.

  be: [T, N] the BE score of every (caption, image); ce: [T, N] the CE score.
  """

  def __init__(self, be, ce):
    self.be, self.ce = np.asarray(be, np.float32), np.asarray(ce, np.float32)

  def texts(self, data, rows):  # [B, N]: dotted with an image's one-hot, its BE score
    return self.be[np.asarray(rows, np.int64)]

  def images(self, data, rows):  # [B, N] one-hot
    return np.eye(self.be.shape[1], dtype=np.float32)[np.asarray(rows, np.int64)]

  def pairs(self, data, texts, images, desc=None):  # [P]
    return self.ce[np.asarray(texts, np.int64), np.asarray(images, np.int64)]


def _data(caption_image, num_images):
  """RetrievalData with captions -> images as given; the scorer ignores tokens and regions."""
  t = len(caption_image)
  return batches.RetrievalData(
      token_ids=np.zeros((t, 2), np.int32), text_mask=np.ones((t, 2), bool),
      caption_image=np.asarray(caption_image, np.int32),
      image_ids=np.arange(num_images, dtype=np.int64),
      region_features=lambda r: (np.zeros((len(r), 1, 1), np.float32), np.ones((len(r), 1), bool)))


def _tables(picture, symbols):
  """[T, N] BE and CE tables of a picture: symbol -> (BE score, CE score)."""
  rows = picture.split()
  be = np.array([[symbols[c][0] for c in row] for row in rows], np.float32)
  ce = np.array([[symbols[c][1] for c in row] for row in rows], np.float32)
  return be, ce


# ------------------------------------------------------------------ recalls by construction

# 12 images, 2 captions each: caption t describes image t // 2 (its "R").
# Every other cell: "." below the relevant image in both BE and CE; "+" above it for the BE
# only; "#" above it for both; "=" tied with it for the BE (below for the CE); "~" above it for
# the BE, tied with it for the CE. So a query's pessimistic BE rank (ties go against the
# relevant item) is its count of + # = ~, its CE rank its count of # ~; and for an image query
# the same counts down its column (both its captions score 0, the best relevant item).
PICTURE = """
R...........
R+..........
.R..........
#R+.........
..R.........
.=R.........
++.R++......
...R........
++++R++.....
.+..R.......
#++++R+.....
.....R......
++++++R++++.
......R.....
~#.....R....
.......R....
#++++++~R+++
+.......R...
#+.+.+...R..
......+..R..
+++.......R.
.........+R.
=====......R
...........R
"""
SYMBOLS = {"R": (0, 0), ".": (-1, -1), "+": (1, -1), "#": (1, 1), "=": (0, -1), "~": (1, 0)}

# Ranks per query, counted from the picture (captions 0..23, images 0..11):
# t2i BE  0 1 0 2 0 1 4 0 6 1 6 0 10 0 2 0 11 1 4 1 3 1 5 0  (ties: caption 5 at R@1, 22 at R@5)
# t2i CE  0 0 0 1 0 0 0 0 0 0 1 0 0 0 2 0 2 0 1 0 0 0 0 0
# i2t BE  11 12 7 6 5 5 4 2 1 3 2 1  (image 4 at R@5 only through the tie of caption 22)
# i2t CE  5 1 0 0 0 0 0 1 0 0 0 0  (image 0: 4 "#" and the tie of caption 14; image 7: a tie)
# RR with the BE top k: a query whose relevant item made the BE top k gets its CE rank (every
# item above it in the CE is above it in the BE, so it is in the top k too), the others keep
# their BE rank. A BE tie across position k (caption 22, image 4 at k = 5) could have brought
# the relevant item in: a tie at every cutoff.
# Expected hits per (method, direction): (R@1, R@5, R@10) out of 24 captions / 12 images, and
# the queries whose hit a tie decided (ties go against the relevant item) at R@1 / R@5 / R@10.
WANT = {
    # k = 5: smaller than both corpora (12 images, 24 captions).
    5: {"BE": {"t2i": ((8, 19, 22), (2, 1, 0)), "i2t": ((0, 6, 10), (0, 1, 0))},
        "CE": {"t2i": ((19, 24, 24), (0, 0, 0)), "i2t": ((9, 11, 12), (1, 1, 0))},
        "RR": {"t2i": ((16, 19, 22), (1, 1, 0)), "i2t": ((5, 6, 10), (2, 1, 0))}},
    # k = 20: larger than the image corpus (t2i reranks all 12), smaller than the captions, but
    # every image's caption is in its BE top 20: RR = CE in both directions.
    20: {"RR": {"t2i": ((19, 24, 24), (0, 0, 0)), "i2t": ((9, 11, 12), (1, 1, 0))}},
}


def _cfg(k):
  return ml_collections.ConfigDict(dict(k=k, ce_queries_t2i=0, ce_queries_i2t=0, rr_queries_t2i=0,
                                        rr_queries_i2t=0))


@pytest.mark.parametrize("k", sorted(WANT))
def test_recalls_of_every_row_equal_the_counts_of_the_picture(k):
  be, ce = _tables(PICTURE, SYMBOLS)
  data = _data(np.arange(24) // 2, 12)
  rows = evaluator.evaluate(_TableScorer(be, ce), data, "joint_sum", _cfg(k), **QUIET)
  assert [r["method"] for r in rows] == ["BE", "CE", "RR"]
  queries = {"t2i": 24, "i2t": 12}
  for row in rows:
    assert row["queries"] == queries, row["method"]
    for d, ((h1, h5, h10), ties) in WANT[k].get(row["method"], {}).items():
      n = queries[d]
      assert row[d] == pytest.approx({"R@1": 100 * h1 / n, "R@5": 100 * h5 / n,
                                      "R@10": 100 * h10 / n}), (row["method"], d)
      assert row["ties"][d] == dict(zip(("R@1", "R@5", "R@10"), ties)), (row["method"], d)
  rr = rows[-1]
  assert rr["k"] == k and rr["k_effective"] == {"t2i": min(k, 12), "i2t": min(k, 24)}


# ------------------------------------------------------------------ fusion from the config

# 5 images, one caption each (caption t describes image t), symmetric tables: i2t = t2i.
# fused = (1 - w) * CE + w * cosine ("combination"); a query's relevant item is "B".
# - captions 0, 1: B has cosine 1, CE 0; the other image of the pair ("A") cosine 0, CE 1:
#   B = w, A = 1 - w, so B is first only for w > 0.5.
# - captions 2, 3: B has CE 1, cosine .5; one image ("C") CE 1, cosine 0; one ("A") CE 0,
#   cosine 1: B = 1 - w/2, C = 1 - w, A = w. CE alone ties B with C (a miss, ties go against
#   the relevant item); w = .1 puts B first; w = .9 puts A first.
# - caption 4: B has CE 1, cosine .5; two A's (CE 0, cosine 1): B first unless w > 2/3.
# Images of the other group score -1 in both. R@1 hits: standard 1 (caption 4); w = .1: 3
# (captions 2, 3, 4); w = .9: 2 (captions 0, 1). The cosine alone (w = 1) would also give 2;
# w = 0 (the weight ignored) 1.
FUSION_BE = [[1, 0, -1, -1, -1],
             [0, 1, -1, -1, -1],
             [-1, -1, .5, 0, 1],
             [-1, -1, 0, .5, 1],
             [-1, -1, 1, 1, .5]]
FUSION_CE = [[0, 1, -1, -1, -1],
             [1, 0, -1, -1, -1],
             [-1, -1, 1, 1, 0],
             [-1, -1, 1, 1, 0],
             [-1, -1, 0, 0, 1]]


@pytest.mark.parametrize("config_module, hits, ties", [
    (flickr30k_fusion_standard, 1, 2),  # captions 2, 3 lose their CE tie
    (flickr30k_fusion_w01, 3, 0),
    (flickr30k_fusion_w09, 2, 0),
])
def test_fusion_of_a_paper_config_reaches_the_rr_order(monkeypatch, config_module, hits, ties):
  config = config_module.get_config("runlocal")
  config.eval.ce_queries_t2i = config.eval.ce_queries_i2t = 0  # the CE row on every query
  data = _data(np.arange(5), 5)
  # The config's own evaluation path: its split comes from load_split, here the stub corpus.
  monkeypatch.setattr(datasets, "load_split", lambda *a, **kw: (data, None))
  results = evaluator.evaluate_config(_TableScorer(FUSION_BE, FUSION_CE), config, None, **QUIET)
  rows = {r["method"]: r for r in results["rows"]}
  rr = rows["RR"]
  assert rr["fusion"] == {"mode": config.eval.fusion, "weight": config.eval.fusion_weight}
  assert rr["k_effective"] == {"t2i": 5, "i2t": 5}
  for d in ("t2i", "i2t"):
    assert rr[d]["R@1"] == pytest.approx(100 * hits / 5), d
    assert rr["ties"][d]["R@1"] == ties, d
  # The two scores it fuses: the BE alone hits captions 0, 1; the CE alone caption 4.
  assert rows["BE"]["t2i"]["R@1"] == rows["BE"]["i2t"]["R@1"] == pytest.approx(40.0)
  assert rows["CE"]["t2i"]["R@1"] == rows["CE"]["i2t"]["R@1"] == pytest.approx(20.0)
