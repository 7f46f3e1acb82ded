"""Flickr30k: bottom-up-attention TSV features + flickr30k_entities captions and splits.

Source directory:
  *.tsv, *.tsv.N      feature rows `img_id, img_w, img_h, num_boxes, boxes, features` (tab
                      separated, no header): boxes [num_boxes, 4] pixel x1 y1 x2 y2 and
                      features [num_boxes, 2048], each base64 of float32
  Sentences/<id>.txt  flickr30k_entities captions, one per line, entity markup
                      `[/EN#18/people A man]` stripped to `A man` (also under annotations/)
  train.txt val.txt test.txt   flickr30k_entities split lists, one image id per line
Feature rows of images in no split list are ignored; the split lists fix the order.
"""

import base64
import binascii
import glob
import os
import re

import numpy as np

from rerank.data.sources import common

SPLITS = ("train", "val", "test")
DEV_SPLIT = "val"
_MARKUP = re.compile(r"\[/EN#\d+(?:/[^\s\]]+)*\s+([^\]]*)\]")


def strip_markup(line: str) -> str:
  """`[/EN#18/people A man] with [/EN#19/clothing ears] .` -> `A man with ears .`"""
  return " ".join(_MARKUP.sub(r"\1", line).split())


class FeatureIndex:
  """Where each image's row sits in the TSV files, so splits read rows in their own order."""

  def __init__(self, paths: list[str], problems: common.Problems):
    self.paths = paths
    self.rows = {}  # image id -> (file index, byte offset, line number)
    for f, path in enumerate(paths):
      offset = 0
      with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
          key = line.split(b"\t", 1)[0].strip().decode("utf-8", "replace")
          if key in self.rows:
            pf, _, pn = self.rows[key]
            problems.bad("duplicate_id", f"{path}:{n}",
                         f"image id {key} already has a feature row at {paths[pf]}:{pn}")
          elif line.strip():
            self.rows[key] = (f, offset, n)
          offset += len(line)

  def __contains__(self, image_id: str) -> bool:
    return image_id in self.rows

  def read(self, image_id: str, problems: common.Problems):
    """(regions [N, 2054] float32, boxes [N, 4] normalised, (w, h)) or None if reported bad."""
    f, offset, n = self.rows[image_id]
    with open(self.paths[f], "rb") as fh:  # an open per image costs microseconds
      fh.seek(offset)
      line = fh.readline()
    return parse_row(line, f"{self.paths[f]}:{n}", problems)


def parse_row(line: bytes, where: str, problems: common.Problems):
  """One BUTD TSV row -> (regions, boxes, (w, h)); None (after reporting) if it is bad."""
  fields = line.rstrip(b"\r\n").split(b"\t")
  if len(fields) != 6:
    problems.bad("malformed_row", where, f"expected 6 tab-separated fields (img_id, img_w, img_h, "
                 f"num_boxes, boxes, features); found {len(fields)}")
    return None
  try:
    w, h, n = int(fields[1]), int(fields[2]), int(fields[3])
    boxes = np.frombuffer(base64.b64decode(fields[4], validate=True), np.float32)
    feats = np.frombuffer(base64.b64decode(fields[5], validate=True), np.float32)
  except (ValueError, binascii.Error) as e:
    problems.bad("malformed_row", where, f"img_w/img_h/num_boxes must be integers and boxes/"
                 f"features base64 float32: {e}")
    return None
  if not common.check_image_size(w, h, where, problems):
    return None
  if not common.check_region_count(n, f"{where}: num_boxes", problems):
    return None
  if boxes.size != 4 * n:
    problems.bad("bad_width", where, f"boxes: expected num_boxes*4 = {4 * n} float32 values; "
                 f"found {boxes.size}")
    return None
  if feats.size != common.FEATURE_DIM * n:
    problems.bad("bad_width", where, f"features: expected num_boxes*{common.FEATURE_DIM} = "
                 f"{common.FEATURE_DIM * n} float32 values; found {feats.size}"
                 + (f" ({feats.size / n:g} per box)" if n else ""))
    return None
  boxes = boxes.reshape(n, 4)
  regions = np.concatenate([feats.reshape(n, -1), common.box_values(boxes, w, h)], 1)
  if not common.check_regions(regions, where, problems):
    return None
  return regions, (boxes / np.float32([w, h, w, h])).astype(np.float32), (w, h)


def feature_paths(source_dir: str, pattern: str | None = None) -> list[str]:
  pattern = pattern or os.path.join(source_dir, "*.tsv*")
  paths = sorted(p for p in glob.glob(pattern) if not p.endswith((".txt", ".json")))
  if not paths:
    raise common.BadInput("missing_file", pattern, "no bottom-up-attention feature TSV files found "
                          "(set --features=GLOB)")
  return paths


def sentences_dir(source_dir: str) -> str:
  for d in ("Sentences", os.path.join("annotations", "Sentences")):
    if os.path.isdir(os.path.join(source_dir, d)):
      return os.path.join(source_dir, d)
  raise common.BadInput("missing_file", os.path.join(source_dir, "Sentences"),
                        "flickr30k_entities Sentences/ directory not found")


def check_files(source_dir: str, splits) -> None:
  sentences_dir(source_dir)
  for split in splits:
    common.require(os.path.join(source_dir, f"{split}.txt"), f"flickr30k_entities {split} list")


def read_sentences(path: str, problems: common.Problems) -> list[str]:
  lines = [strip_markup(line) for line in common.read_lines(path)]
  while lines and not lines[-1]:  # a trailing newline is not an empty caption
    lines.pop()
  return common.clean_captions(lines, path, problems)


def read(source_dir: str, split: str, problems: common.Problems, index: FeatureIndex):
  """Yields the split's `Image`s in split-list order."""
  sdir = sentences_dir(source_dir)
  list_path = os.path.join(source_dir, f"{split}.txt")
  for k in common.read_id_list(list_path, problems):
    where = f"{list_path}: image id {k}"
    cap_path = os.path.join(sdir, f"{k}.txt")
    has_caps = os.path.exists(cap_path)
    if k not in index:
      problems.bad("caption_without_image" if has_caps else "image_without_captions", where,
                   "no feature row in " + ", ".join(os.path.basename(p) for p in index.paths))
      continue
    if not has_caps:
      problems.bad("image_without_captions", where, f"missing {cap_path}")
      continue
    caps = read_sentences(cap_path, problems)
    if not caps:
      problems.bad("image_without_captions", where, f"no non-empty captions in {cap_path}")
      continue
    row = index.read(k, problems)
    if row is None:
      continue
    regions, boxes, size = row
    yield common.Image(image_id=k, regions=regions, boxes=boxes, image_size=size,
                       captions=caps, languages=["en"] * len(caps))
