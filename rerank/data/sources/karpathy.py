"""Image files + captions in the Karpathy-split JSON format, for the pixel families.

The format of `dataset_coco.json`, `dataset_flickr30k.json` (Karpathy & Fei-Fei's splits):
  {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
    "split": "train" | "restval" | "val" | "test", "cocoid": 391895, "imgid": 0,
    "sentences": [{"raw": "A man riding a bike.", "tokens": [...], ...}, ...]}, ...]}
plus an image directory: image i is IMAGE_DIR/filepath/filename (`filepath` is absent in the
Flickr30k file: IMAGE_DIR/filename).

- Splits: train, val, test. `restval` images join train (the Karpathy convention behind the
  113k-image COCO training set), in the JSON's order.
- Image ids: `cocoid` where the entry has one (COCO's image id), else the file name without
  extension (Flickr30k: the Flickr photo id), so ids match the region releases' ids.
- Captions: `sentences[].raw`, whitespace-normalised.
- Images are decoded in full here (`rerank.data.images.decode`), so a file that cannot be used
  stops the prepare now, not a training run later. Plain 8-bit RGB or grey JPEG / PNG files
  are stored as they are (their bytes); images that needed converting (CMYK, 16-bit, alpha or
  palette, EXIF-rotated, other formats) are stored as the converted, upright RGB image,
  re-encoded as PNG so that nothing is lost a second time. Missing, unreadable, truncated or
  huge images (over `images.MAX_PIXELS`) are bad input, as are malformed entries and
  duplicate ids: one error naming the file and image id, or with `--skip_bad` a count.
"""

import collections
import concurrent.futures
import dataclasses
import io
import json
import os

from rerank.data import images
from rerank.data.sources import common

SPLITS = ("train", "val", "test")
DEV_SPLIT = "val"
JSON_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
STORED_FORMATS = ("JPEG", "PNG")  # kept byte for byte when nothing was converted
_CHUNK = 64  # images decoded in parallel at a time (Pillow releases the GIL while decoding)


@dataclasses.dataclass
class Entry:
  """One valid entry of the JSON file."""

  image_id: str
  split: str          # ours: restval -> train
  filename: str       # relative to the image directory
  captions: list[str]
  listed_as: str      # the JSON's split (train, restval, val or test)


def check_files(json_path: str, image_dir: str) -> None:
  """Raises BadInput for a missing JSON file or image directory, before any work starts."""
  common.require(json_path, "the Karpathy-split JSON file (--karpathy_json)")
  if not os.path.isdir(image_dir):
    raise common.BadInput("missing_file", image_dir, "expected the directory the JSON's "
                          "filepath/filename entries are relative to (--source_dir)")


def load_json(path: str) -> list:
  """The JSON's "images" list; one BadInput naming the file for anything else."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    value = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise common.BadInput("bad_file", path, f"expected UTF-8 JSON; found byte "
                          f"0x{data[e.start]:02x} at offset {e.start}") from None
  except json.JSONDecodeError as e:
    raise common.BadInput("bad_file", f"{path}:{e.lineno}:{e.colno}",
                          f"expected JSON; found: {e.msg}") from None
  if not isinstance(value, dict) or not isinstance(value.get("images"), list):
    found = (f"keys {sorted(value)[:5]}" if isinstance(value, dict) else type(value).__name__)
    raise common.BadInput("bad_file", path, f'expected {{"images": [...]}} (a Karpathy-split '
                          f"file such as dataset_coco.json); found {found}")
  return value["images"]


def _entry(i: int, item, path: str, problems: common.Problems) -> Entry | None:
  """A valid `Entry` of images[i], or None after reporting what is wrong with it."""
  where = f"{path}: images[{i}]"
  if not isinstance(item, dict):
    problems.bad("malformed_row", where, f"expected an object; found {type(item).__name__}")
    return None
  filename, filepath = item.get("filename"), item.get("filepath", "")
  if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
    problems.bad("malformed_row", where, f'expected "filename" (and optional "filepath") '
                 f"strings; found {filename!r}, {filepath!r}")
    return None
  image_id = item.get("cocoid", os.path.splitext(os.path.basename(filename))[0])
  if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
    problems.bad("malformed_row", where, f'"cocoid": expected an integer; found {image_id!r}')
    return None
  image_id = str(image_id)
  where = f"{where} (image id {image_id})"
  relative = os.path.normpath(os.path.join(filepath, filename))
  if (not common.is_plain_id(image_id) or os.path.isabs(relative)
      or relative.split(os.sep)[0] == ".."):
    problems.bad("malformed_row", where, f"{os.path.join(filepath, filename)!r}: expected a "
                 f"file inside the image directory and a plain image id")
    return None
  split = item.get("split")
  if split not in JSON_SPLITS:
    problems.bad("malformed_row", where, f'"split": expected one of {list(JSON_SPLITS)}; '
                 f"found {split!r}")
    return None
  sentences = item.get("sentences")
  if (not isinstance(sentences, list)
      or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences)):
    problems.bad("malformed_row", where, '"sentences": expected a list of {"raw": caption}')
    return None
  captions = common.clean_captions([s["raw"] for s in sentences], where, problems)
  if not captions:
    problems.bad("image_without_captions", where, "no non-empty captions")
    return None
  return Entry(image_id, JSON_SPLITS[split], relative, captions, split)


def read_entries(path: str, problems: common.Problems) -> list[Entry]:
  """The file's valid entries in order; duplicate ids (also `12` and `012`, one number once
  training reads ids) and one file listed twice are bad input."""
  out, ids, files = [], {}, {}
  for i, item in enumerate(load_json(path)):
    e = _entry(i, item, path, problems)
    if e is None:
      continue
    key = common.canonical_id(e.image_id)
    if key in ids or e.filename in files:
      first = ids.get(key, files.get(e.filename))
      problems.bad("duplicate_id", f"{path}: images[{i}] (image id {e.image_id})",
                   f"same image id or file as images[{first}]")
      continue
    ids[key] = files[e.filename] = i
    out.append(e)
  return out


def stored(path: str, name: str) -> tuple[bytes, tuple[int, int], list[str]]:
  """(encoded bytes to store, (width, height), changes made) of one image file."""
  decoded = images.decode(path, name)
  if not decoded.changes and decoded.format in STORED_FORMATS:
    with open(path, "rb") as f:
      return f.read(), decoded.image.size, []
  buf = io.BytesIO()
  decoded.image.save(buf, "PNG")  # lossless: the converted pixels exactly
  changes = decoded.changes or [f"{decoded.format} -> PNG"]
  return buf.getvalue(), decoded.image.size, changes


def _stored_or_error(path: str, name: str):
  try:
    return stored(path, name)
  except images.BadImage as e:
    return e


def read(entries: list[Entry], image_dir: str, split: str, problems: common.Problems,
         converted: collections.Counter | None = None, workers: int = 4):
  """Yields the split's `common.PixelImage`s in JSON order; counts conversions in `converted`."""
  todo = [e for e in entries if e.split == split]
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for start in range(0, len(todo), _CHUNK):
      chunk = todo[start:start + _CHUNK]
      paths = [os.path.join(image_dir, e.filename) for e in chunk]
      for e, path, got in zip(chunk, paths, pool.map(_stored_or_error, paths, paths)):
        if isinstance(got, images.BadImage):
          problems.bad(got.kind, f"{path} (image id {e.image_id})", got.reason)
          continue
        data, size, changes = got
        if converted is not None:
          converted.update(changes)
        yield common.PixelImage(image_id=e.image_id, filename=e.filename, data=data,
                                image_size=size, captions=e.captions,
                                languages=["en"] * len(e.captions))
