"""How well a model tells a caption's image from its synthetic_scenes siblings, by kind of edit.

Every synthetic_scenes family is a base scene plus one-edit variants (an attribute changed, two
objects swapping a colour/material, two objects swapping places); every caption is false of its
image's siblings. Per kind of edit between the two images, `report` gives the fraction of
(caption, sibling) pairs where the BE cosine and the CE score rank the caption's own image
first: where the CE should beat a mean-pooled BE, and whether it does.
`report_workdir` restores a training workdir and measures it (`python -m rerank.sibling_report`).
"""

import numpy as np

from rerank.data import datasets
from rerank.data import synthetic_scenes
from rerank.inference import engine


EDITS = ("attribute change", "binding swap", "position swap", "two edits")


def edit_kind(scenes, a: int, b: int) -> str:
  """Which edit separates image rows a and b of one family (see the module docstring)."""
  if a % scenes.family_size and b % scenes.family_size:
    return "two edits"  # neither is the base: each is one edit away from it
  objs = [sorted(map(tuple, scenes.attributes[r, :scenes.num_regions[r]].tolist())) for r in (a, b)]
  if objs[0] == objs[1]:
    return "position swap"
  same_values = all(sorted(o[c] for o in objs[0]) == sorted(o[c] for o in objs[1]) for c in range(4))
  return "binding swap" if same_values else "attribute change"


def sibling_pairs(caption_image: np.ndarray, family_size: int):
  """(caption rows [P], sibling image rows [P]) for every caption and each of its siblings."""
  img = np.repeat(caption_image, family_size - 1)
  first = img - img % family_size
  offset = np.tile(np.arange(1, family_size), len(caption_image))
  return (np.repeat(np.arange(len(caption_image)), family_size - 1),
          first + (img - first + offset) % family_size)


def report(scorer, data, scenes, has_be: bool, has_ce: bool) -> dict:
  """{edit: {"pairs": n, "BE": acc, "CE": acc}} plus "all"."""
  txt, sib = sibling_pairs(data.caption_image, scenes.family_size)
  own = data.caption_image[txt]
  kinds = np.array([edit_kind(scenes, a, b) for a, b in zip(own, sib)])
  correct = {}
  if has_be:
    t = scorer.texts(data, np.arange(data.num_texts))
    v = scorer.images(data, np.arange(data.num_images))
    correct["BE"] = (t[txt] * v[own]).sum(1) > (t[txt] * v[sib]).sum(1)
  if has_ce:
    s_own = scorer.pairs(data, np.arange(data.num_texts), data.caption_image, "CE own")
    correct["CE"] = s_own[txt] > scorer.pairs(data, txt, sib, "CE siblings")
  out = {}
  for name in (*EDITS, "all"):
    sel = np.ones(len(kinds), bool) if name == "all" else kinds == name
    if sel.any():
      out[name] = {"pairs": int(sel.sum()), **{m: float(c[sel].mean()) for m, c in correct.items()}}
  return out


def report_workdir(workdir: str, split: str = "test", latest: bool = False) -> tuple[dict, str]:
  """(`report`'s rows, which checkpoint) for a training workdir on generated synthetic_scenes.

  Raises FileNotFoundError or ValueError (no checkpoint; another dataset).
  """
  m = engine.restore_workdir(workdir, latest=latest)
  cfg, ds = m.config, m.config.dataset
  if ds.name != "synthetic_scenes" or ds.get("data_dir"):
    raise ValueError(f"{workdir}: config.dataset.name must be a generated synthetic_scenes; "
                     f"found {ds.name!r}")
  data, _ = datasets.load_split(cfg, split, m.tokenizer)
  scenes = synthetic_scenes.generate(
      split, seed=ds.seed, family_size=ds.family_size, noise_std=ds.noise_std,
      min_objects=ds.get("min_objects", 2), max_objects=ds.get("max_objects", 4))
  scorer = engine.DataScorer(m.engine(cfg.eval.batch_size))
  return report(scorer, data, scenes, m.mode.has_be, m.mode.has_ce), m.description
