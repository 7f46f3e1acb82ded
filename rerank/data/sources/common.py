"""What every source reader yields, and how it reports bad input.

A reader turns one release (files on disk) into, per split, a stream of `Image` records in a
fixed order. Everything a reader finds wrong goes through `Problems.bad(kind, where, reason)`:
by default that raises `BadInput` naming the file, line or id; with `--skip_bad` the item is
dropped and counted under `kind`, so prepare can report what it left out.
"""

import collections
import dataclasses
import gzip
import os

import numpy as np

from rerank import errors

FEATURE_DIM = 2048
REGION_DIM = FEATURE_DIM + 6  # feature + [x1/W, y1/H, x2/W, y2/H, w/W, h/H]
MAX_REGIONS = 100  # the detectors behind every release keep 10-100 boxes

# Kinds of bad input, the keys of the `skipped` counts prepare reports.
KINDS = ("malformed_row", "bad_width", "non_finite", "bad_region_count", "duplicate_id",
         "caption_without_image", "image_without_captions", "empty_caption", "missing_file")


class BadInput(errors.UserError):
  """One bad item in a source release: where it is (file:line, or file + id) and why."""

  def __init__(self, kind: str, where: str, reason: str):
    super().__init__(f"{where}: {reason}")
    self.kind = kind


@dataclasses.dataclass
class Problems:
  """Raises on the first bad item, or (skip=True) counts them by kind."""

  skip: bool = False
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def bad(self, kind: str, where: str, reason: str):
    assert kind in KINDS, kind
    if not self.skip:
      raise BadInput(kind, where, reason)
    self.counts[kind] += 1


@dataclasses.dataclass
class Image:
  """One image of a split: its detector regions and captions (with their languages)."""

  image_id: str
  regions: np.ndarray   # [N, 2054] float32: 2048 feature + 6 normalised box values
  boxes: np.ndarray     # [N, 4] float32 [x1/W, y1/H, x2/W, y2/H]
  image_size: tuple[int, int]  # (width, height) in pixels; (0, 0) where the release omits it
  captions: list[str]
  languages: list[str]


def box_values(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
  """Pixel boxes [N, 4] (x1, y1, x2, y2) -> the 6 OSCAR values [N, 6], float32."""
  b = boxes.astype(np.float64) / [width, height, width, height]
  return np.concatenate([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], 1).astype(np.float32)


def check_regions(regions: np.ndarray, where: str, problems: Problems) -> bool:
  """Shape [1..100, 2054] and finite values; reports and returns False otherwise."""
  if regions.ndim != 2 or regions.shape[1] != REGION_DIM:
    problems.bad("bad_width", where, f"region features: expected shape [N, {REGION_DIM}] "
                 f"(2048 feature + 6 box values); found {list(regions.shape)}")
    return False
  if not 1 <= regions.shape[0] <= MAX_REGIONS:
    problems.bad("bad_region_count", where,
                 f"expected 1 to {MAX_REGIONS} regions; found {regions.shape[0]}")
    return False
  if not np.isfinite(regions).all():
    r, c = np.argwhere(~np.isfinite(regions))[0]
    problems.bad("non_finite", where,
                 f"region {r} value {c} is {regions[r, c]} (features must be finite)")
    return False
  return True


def clean_captions(captions: list[str], where: str, problems: Problems) -> list[str]:
  """Whitespace-normalised captions; an empty one is bad input (dropped with --skip_bad)."""
  out = []
  for i, c in enumerate(captions):
    c = " ".join(str(c).split())
    if not c:
      problems.bad("empty_caption", where, f"caption {i} is empty")
      continue
    out.append(c)
  return out


def open_text(path: str):
  """Opens a text file, transparently gunzipping `*.gz` (the Multi30k repo ships both)."""
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise BadInput("missing_file", path, f"missing: {what}")
  return path


def read_id_list(path: str, problems: Problems) -> list[str]:
  """One image id per line (blank lines ignored; `123.jpg` -> `123`); duplicates are bad input."""
  ids, seen = [], {}
  with open_text(path) as f:
    for n, line in enumerate(f, 1):
      key = line.strip()
      if not key:
        continue
      key = os.path.splitext(key)[0] if key.endswith((".jpg", ".png", ".jpeg")) else key
      if key in seen:
        problems.bad("duplicate_id", f"{path}:{n}", f"image id {key} already listed on line {seen[key]}")
        continue
      seen[key] = n
      ids.append(key)
  return ids
