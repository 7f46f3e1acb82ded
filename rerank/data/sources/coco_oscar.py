"""MSCOCO as OSCAR's `coco_ir` release: image key lists, captions and features as torch files.

Files in the source directory, per split S in {train, minival, test}:
  S_img_keys.tsv          one image id per line (the split and its order)
  S_captions.pt           dict image id -> list of captions (or a JSON string of that list)
  S_img_frcnn_feats.pt    dict image id -> float tensor [N, 2054]: 2048 feature values, the
                          4 normalised box corners, then normalised width and height
and test_img_keys_1k.tsv: the authors' single 1k fold of test (its captions and features
come from the test files). Reading .pt needs torch (the optional `torch` extra); files are
loaded with `weights_only=True`, which refuses anything but tensors and plain containers.
"""

import json
import os

import numpy as np

from rerank.data.sources import common

SPLITS = ("train", "minival", "test", "test1k")
DEV_SPLIT = "minival"
NESTED = {"test1k": "test"}  # the 1k fold's images are test images by design


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("coco_oscar reads torch .pt files: install the optional extra "
                       "(pip install -e '.[torch]')") from e
  # Older weights_only loaders can be made to run code: the floor of setup.py's torch extra,
  # checked as rerank.models.pretrained.import_safe_torch does (data may not import models).
  if tuple(int("".join(filter(str.isdigit, p)) or 0) for p in torch.__version__.split(".")[:2]) < (2, 10):
    raise common.BadInput("bad_file", f"torch {torch.__version__}", "reading .pt files safely needs "
                          "torch >= 2.10 (older weights_only loaders can be made to run code): "
                          "pip install -U 'torch>=2.10'")
  return torch


def _load_pt(path: str):
  torch = _torch()
  try:  # mmap keeps a 40 GB feature file out of RAM (zip-format files only)
    return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
  except Exception:  # pylint: disable=broad-except  # legacy format or bad file: retry plainly
    pass
  try:
    return torch.load(path, weights_only=True, map_location="cpu")
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
    detail = (str(e).splitlines() or [type(e).__name__])[0]  # EOFError has no message
    if os.path.getsize(path) == 0:
      detail = "the file is empty (0 bytes)"
    raise common.BadInput("bad_file", path, f"not a readable torch file of tensors and "
                          f"plain containers: {detail}") from e


def _by_id(value, path: str, what: str, problems: common.Problems) -> dict:
  """A loaded `{image id: value}` dict with str keys; anything else is one error naming `path`.

  Keys `5` and `"5"` (or `"05"`) are one image once ids are strings and then numbers: bad input,
  not one of them silently dropped.
  """
  if not isinstance(value, dict):
    raise common.BadInput("bad_file", path, f"expected a dict of image id -> {what}; found "
                          f"{type(value).__name__}")
  out, spelled = {}, {}  # str id -> value; canonical id -> key as stored
  for key, v in value.items():
    if isinstance(key, bool) or not isinstance(key, (int, str)):
      raise common.BadInput("bad_file", path, f"expected image ids as int or str keys; found "
                            f"{key!r} ({type(key).__name__})")
    canonical = common.canonical_id(str(key))
    if canonical in spelled:
      problems.bad("duplicate_id", f"{path}: image id {key!r}", f"and image id "
                   f"{spelled[canonical]!r} are one image (keys are read as strings, then "
                   f"numbers); keep one of them")
      continue
    spelled[canonical] = key
    out[str(key)] = v
  return out


def _regions(value, where: str, problems: common.Problems):
  """A stored feature value -> [N, 2054] float32 array, or None after reporting it."""
  try:
    return np.asarray(value.float().numpy() if hasattr(value, "numpy") else value, np.float32)
  except (ValueError, TypeError, RuntimeError) as e:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    problems.bad("malformed_row", where, f"region features: expected a float tensor [N, "
                 f"{common.REGION_DIM}]; found {type(value).__name__} {shown} "
                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return None


def _captions(value, where: str, problems: common.Problems):
  if isinstance(value, str):  # OSCAR stores some caption lists as JSON strings
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      value = [value]
  if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
    problems.bad("malformed_row", where, f"expected a list of caption strings; found "
                 f"{type(value).__name__}")
    return []
  return common.clean_captions(list(value), where, problems)


def _split_files(source_dir: str, split: str):
  base = "test" if split == "test1k" else split
  keys = "test_img_keys_1k.tsv" if split == "test1k" else f"{split}_img_keys.tsv"
  return tuple(os.path.join(source_dir, f) for f in
               (keys, f"{base}_captions.pt", f"{base}_img_frcnn_feats.pt"))


def check_files(source_dir: str, splits) -> None:
  """Raises BadInput for the first missing file, before any work starts."""
  for split in splits:
    for path in _split_files(source_dir, split):
      common.require(path, f"coco_oscar split {split!r} needs this file")


def read(source_dir: str, split: str, problems: common.Problems):
  """Yields the split's `Image`s in key-file order."""
  keys_path, cap_path, feat_path = _split_files(source_dir, split)
  keys = common.read_id_list(keys_path, problems)
  captions = _by_id(_load_pt(cap_path), cap_path, "list of captions", problems)
  feats = _by_id(_load_pt(feat_path), feat_path, "float tensor [N, 2054]", problems)
  if split != "test1k":  # the 1k fold reads the 5k files: their other ids are expected
    listed = set(keys)
    for k in captions:
      if k not in listed and k not in feats:
        problems.bad("caption_without_image", f"{cap_path}: image id {k}",
                     f"has captions but no features in {os.path.basename(feat_path)} and is not "
                     f"in {os.path.basename(keys_path)}")
  for k in keys:
    where = f"{keys_path}: image id {k}"
    if k not in feats:
      kind = "caption_without_image" if k in captions else "image_without_captions"
      problems.bad(kind, where, f"no features in {os.path.basename(feat_path)}")
      continue
    if k not in captions:
      problems.bad("image_without_captions", where, f"no captions in {os.path.basename(cap_path)}")
      continue
    caps = _captions(captions[k], f"{cap_path}: image id {k}", problems)
    if not caps:
      problems.bad("image_without_captions", where, "no non-empty captions")
      continue
    regions = _regions(feats[k], f"{feat_path}: image id {k}", problems)
    if regions is None or not common.check_regions(regions, f"{feat_path}: image id {k}",
                                                   problems):
      continue
    yield common.Image(image_id=k, regions=regions, boxes=regions[:, 2048:2052].copy(),
                       image_size=(0, 0), captions=caps, languages=["en"] * len(caps))
