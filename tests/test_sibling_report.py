"""Sibling report: edit kinds between family members, sibling pairs, per-edit accuracies."""

import types

import numpy as np

from rerank.evaluation import siblings as sr

# One family of 4: base, a colour swap between its two objects, a place swap, a changed size.
_ATTRS = np.array([[[0, 1, 0, 0], [2, 3, 1, 1]],    # base: (cube, blue ...), (cylinder, yellow ...)
                   [[0, 3, 0, 0], [2, 1, 1, 1]],    # colours swapped
                   [[2, 3, 1, 1], [0, 1, 0, 0]],    # same objects (other order); places swapped
                   [[0, 1, 0, 2], [2, 3, 1, 1]]])   # one size changed
_SCENES = types.SimpleNamespace(attributes=_ATTRS, num_regions=np.array([2, 2, 2, 2]),
                                family_size=4)


def test_edit_kind_names_each_one_edit_variant():
  assert sr.edit_kind(_SCENES, 0, 1) == "binding swap"
  assert sr.edit_kind(_SCENES, 2, 0) == "position swap"
  assert sr.edit_kind(_SCENES, 0, 3) == "attribute change"
  assert sr.edit_kind(_SCENES, 1, 3) == "two edits"


def test_sibling_pairs_lists_every_other_family_member():
  caption_image = np.array([0, 0, 3, 5, 6])
  txt, sib = sr.sibling_pairs(caption_image, 4)
  expected = [(t, s) for t, i in enumerate(caption_image)
              for s in range(i - i % 4, i - i % 4 + 4) if s != i]
  assert sorted(zip(txt.tolist(), sib.tolist())) == sorted(expected)


def test_report_counts_where_the_own_image_wins():
  data = types.SimpleNamespace(caption_image=np.array([0, 3]), num_texts=2, num_images=4)

  class Scorer:  # BE: caption 0 prefers its image; caption 1 prefers image 0 over its own 3
    def texts(self, data, rows):
      return np.array([[1.0, 0.0], [0.0, 1.0]])[rows]

    def images(self, data, rows):
      return np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.5]])[rows]

    def pairs(self, data, txt, img, desc=""):
      return -np.asarray(img, float)  # CE: lower image rows score higher

  out = sr.report(Scorer(), data, _SCENES, True, True)
  # caption 0 (image 0) vs siblings 1, 2, 3: BE 1 > 0 each time; CE 0 > -s each time
  # caption 1 (image 3) vs 0, 1, 2: BE 0.5 vs 1, 0, 0; CE -3 loses to every sibling
  assert out["all"] == {"pairs": 6, "BE": 5 / 6, "CE": 3 / 6}
  assert out["binding swap"] == {"pairs": 1, "BE": 1.0, "CE": 1.0}
  assert out["attribute change"] == {"pairs": 2, "BE": 0.5, "CE": 0.5}
  assert out["two edits"] == {"pairs": 2, "BE": 1.0, "CE": 0.0}
