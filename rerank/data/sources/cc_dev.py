"""Conceptual Captions dev (validation) images, used as distractors in enlarged test sets.

Source directory:
  <image_id>.npz   per image: x [N, 2048] features, bbox [N, 4] pixel x1 y1 x2 y2,
                   num_bbox, image_h, image_w (the layout of the authors' CC features)
  captions.tsv     `image_id <TAB> caption`, one line per caption (the id is the .npz stem)
One split, `dev`, in sorted image-id order.
"""

import glob
import os
import zipfile

import numpy as np

from rerank.data.sources import common

SPLITS = ("dev",)
DEV_SPLIT = "dev"
_KEYS = ("x", "bbox", "num_bbox", "image_h", "image_w")


def check_files(source_dir: str, splits) -> None:
  del splits
  common.require(os.path.join(source_dir, "captions.tsv"), "CC dev captions (id <TAB> caption)")


def read_captions(path: str, problems: common.Problems) -> dict[str, list[str]]:
  out, first = {}, {}  # id -> captions; canonical id -> (id, line)
  for n, line in enumerate(common.read_lines(path), 1):
    if not line.strip():
      continue
    key, tab, caption = line.partition("\t")
    key = key.strip()
    if not tab:
      problems.bad("malformed_row", f"{path}:{n}", "expected `image_id<TAB>caption`")
      continue
    seen = first.setdefault(common.canonical_id(key), (key, n))
    if seen[0] != key:  # `12` and `012`: one image once ids are read as numbers
      problems.bad("duplicate_id", f"{path}:{n}", f"image id {key!r} and image id {seen[0]!r} "
                   f"(line {seen[1]}) are one number")
      continue
    for c in common.clean_captions([caption], f"{path}:{n}", problems):
      out.setdefault(key, []).append(c)
  return out


def _load(path: str, problems: common.Problems):
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in _KEYS if k not in z]
      if missing:
        problems.bad("malformed_row", path, f"missing keys {missing}; expected {list(_KEYS)}")
        return None
      x, bbox = np.asarray(z["x"], np.float32), np.asarray(z["bbox"], np.float32)
      n, h, w = int(z["num_bbox"]), float(z["image_h"]), float(z["image_w"])
  except (OSError, ValueError, TypeError, OverflowError, zipfile.BadZipFile) as e:
    problems.bad("malformed_row", path, f"not a readable .npz of numbers: {e}")
    return None
  if not common.check_region_count(n, f"{path}: num_bbox", problems):
    return None
  if x.ndim != 2 or x.shape[1] != common.FEATURE_DIM or x.shape[0] != n:
    problems.bad("bad_width", path, f"x: expected [num_bbox={n}, {common.FEATURE_DIM}]; found "
                 f"{list(x.shape)}")
    return None
  if bbox.shape != (n, 4):
    problems.bad("bad_width", path, f"bbox: expected [num_bbox={n}, 4]; found {list(bbox.shape)}")
    return None
  if not common.check_image_size(w, h, path, problems):
    return None
  regions = np.concatenate([x, common.box_values(bbox, w, h)], 1)
  if not common.check_regions(regions, path, problems):
    return None
  return regions, (bbox / np.float32([w, h, w, h])).astype(np.float32), (int(w), int(h))


def read(source_dir: str, split: str, problems: common.Problems):
  """Yields the dev `Image`s in sorted id order."""
  del split
  cap_path = os.path.join(source_dir, "captions.tsv")
  captions = read_captions(cap_path, problems)
  paths = {os.path.splitext(os.path.basename(p))[0]: p
           for p in glob.glob(os.path.join(source_dir, "*.npz"))}
  for k in sorted(captions):
    if k not in paths:
      problems.bad("caption_without_image", f"{cap_path}: image id {k}", f"no {k}.npz")
  for k in sorted(paths):
    if k not in captions:
      problems.bad("image_without_captions", paths[k], f"no line for {k} in {cap_path}")
      continue
    row = _load(paths[k], problems)
    if row is None:
      continue
    regions, boxes, size = row
    yield common.Image(image_id=k, regions=regions, boxes=boxes, image_size=size,
                       captions=captions[k], languages=["en"] * len(captions[k]))
