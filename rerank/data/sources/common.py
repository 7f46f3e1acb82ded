"""What every source reader yields, and how it reports bad input.

A reader turns one release (files on disk) into, per split, a stream of `Image` records in a
fixed order. Everything a reader finds wrong goes through `Problems.bad(kind, where, reason)`:
by default that raises `BadInput` naming the file, line or id; with `--skip_bad` the item is
dropped and counted under `kind`, so prepare can report what it left out.
"""

import collections
import dataclasses
import gzip
import math
import os
import unicodedata
import zlib

import numpy as np

from rerank import errors

FEATURE_DIM = 2048
REGION_DIM = FEATURE_DIM + 6  # feature + [x1/W, y1/H, x2/W, y2/H, w/W, h/H]
MAX_REGIONS = 100  # the detectors behind every release keep 10-100 boxes

MAX_SIDE = 2**31 - 1  # image sizes are stored as int32

# Kinds of bad input, the keys of the `skipped` counts prepare reports.
KINDS = ("malformed_row", "bad_width", "non_finite", "bad_region_count", "duplicate_id",
         "caption_without_image", "image_without_captions", "empty_caption", "missing_file",
         "bad_file", "missing_image", "bad_image", "huge_image")
# Kinds that concern a whole file, not one item: `--skip_bad` cannot skip them.
FILE_KINDS = ("missing_file", "bad_file")


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


@dataclasses.dataclass
class PixelImage:
  """One image of a split read from an image file (`sources.karpathy`): its encoded bytes."""

  image_id: str
  filename: str          # path relative to the image directory, as the source lists it
  data: bytes            # the encoded file (JPEG / PNG), re-encoded only where converted
  image_size: tuple[int, int]  # (width, height) in pixels, upright
  captions: list[str]
  languages: list[str]


def box_values(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
  """Pixel boxes [N, 4] (x1, y1, x2, y2) -> the 6 OSCAR values [N, 6], float32."""
  b = boxes.astype(np.float64) / [width, height, width, height]
  return np.concatenate([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], 1).astype(np.float32)


def check_image_size(width, height, where: str, problems: Problems) -> bool:
  """Finite, positive and storable as int32; reports and returns False otherwise."""
  ok = all(isinstance(v, (int, float)) and math.isfinite(v) and 1 <= v <= MAX_SIDE
           for v in (width, height))
  if not ok:
    problems.bad("malformed_row", where, f"image size: expected width and height from 1 to "
                 f"{MAX_SIDE} pixels; found {width!r} x {height!r}")
  return ok


def check_region_count(n: int, where: str, problems: Problems) -> bool:
  if not 1 <= n <= MAX_REGIONS:
    problems.bad("bad_region_count", where, f"expected 1 to {MAX_REGIONS} regions; found {n}")
    return False
  return True


def check_regions(regions: np.ndarray, where: str, problems: Problems) -> bool:
  """Shape [1..100, 2054] and finite values; reports and returns False otherwise."""
  if regions.ndim != 2 or regions.shape[1] != REGION_DIM:
    problems.bad("bad_width", where, f"region features: expected shape [N, {REGION_DIM}] "
                 f"(2048 feature + 6 box values); found {list(regions.shape)}")
    return False
  if not check_region_count(regions.shape[0], where, problems):
    return False
  if not np.isfinite(regions).all():
    r, c = np.argwhere(~np.isfinite(regions))[0]
    problems.bad("non_finite", where,
                 f"region {r} value {c} is {regions[r, c]} (features must be finite)")
    return False
  return True


def is_blank(text: str) -> bool:
  """True for text of only whitespace, control and format characters (zero-width space, BOM,
  soft hyphen, ...): nothing a tokenizer would keep."""
  return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def clean_captions(captions: list[str], where: str, problems: Problems) -> list[str]:
  """Whitespace-normalised captions; an empty one is bad input (dropped with --skip_bad)."""
  out = []
  for i, c in enumerate(captions):
    c = " ".join(str(c).split())
    if is_blank(c):
      problems.bad("empty_caption", where, f"caption {i} is empty")
      continue
    out.append(c)
  return out


def read_lines(path: str) -> list[str]:
  """A UTF-8 text file's lines (`*.gz` gunzipped: the Multi30k repo ships both).

  Raises BadInput naming the file and line for text in another encoding (latin-1, say).
  """
  if path.endswith(".gz"):
    try:
      with gzip.open(path, "rb") as f:
        data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, or cut short
      raise BadInput("bad_file", path, f"expected a complete gzip file; found: {e}") from None
  else:
    with open(path, "rb") as f:
      data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise BadInput("bad_file", f"{path}:{line}", f"expected UTF-8 text; found byte "
                   f"0x{data[e.start]:02x} (re-encode the file as UTF-8)") from None
  # Universal newlines, as text-mode files split: not str.splitlines, which also splits at
  # U+2028 and friends inside a caption and would shift every later line.
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  return lines[:-1] if lines[-1] == "" else lines


def require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise BadInput("missing_file", path, f"missing: {what}")
  return path


def canonical_id(image_id: str) -> str:
  """The id as training sees it: all-digit ids become numbers there (`012` -> 12), see
  `rerank.data.prepared.numeric_ids`; two ids with one canonical form are one image."""
  return str(int(image_id)) if image_id.isascii() and image_id.isdigit() else image_id


def is_plain_id(image_id: str) -> bool:
  """An id that can name a file inside the source directory (no path, no `..`, no NUL)."""
  return (image_id not in (".", "..") and not any(c in image_id for c in "/\\\0")
          and not os.path.isabs(image_id))


def read_id_list(path: str, problems: Problems) -> list[str]:
  """One image id per line (blank lines ignored; `123.jpg` -> `123`).

  Duplicates (also `12` and `012`, one image once read as numbers) and ids that are not plain
  file names (`../x`: readers open `<id>.txt` files) are bad input.
  """
  ids, seen = [], {}  # canonical id -> (id, line)
  for n, line in enumerate(read_lines(path), 1):
    key = line.strip()
    if not key:
      continue
    key = os.path.splitext(key)[0] if key.endswith((".jpg", ".png", ".jpeg")) else key
    if not is_plain_id(key):
      problems.bad("malformed_row", f"{path}:{n}", f"image id {key!r}: expected a plain name "
                   f"(no '/', '\\' or '..': ids name files in the source directory)")
      continue
    first = seen.get(canonical_id(key))
    if first is not None:
      same = "" if first[0] == key else f" ({first[0]!r} and {key!r} are one number)"
      problems.bad("duplicate_id", f"{path}:{n}",
                   f"image id {key} already listed on line {first[1]}{same}")
      continue
    seen[canonical_id(key)] = (key, n)
    ids.append(key)
  return ids
