"""Writes source `Image` streams as TFDS datasets (array_record, no TensorFlow) and reads them.

One record per image, in the source's order (shuffling disabled: training order comes from
`rerank.data.batches`, not from the file):
  image_id    text
  regions     [N, 2054] float16 or float32 (chosen at prepare time): 2048 feature values and
              the 6 box values [x1/W, y1/H, x2/W, y2/H, w/W, h/H]
  boxes       [N, 4] float32 [x1/W, y1/H, x2/W, y2/H] (exact, whatever the regions dtype)
  image_size  [2] int32 (width, height) in pixels, (0, 0) where the release omits it
  captions    [C] text, with `languages` [C] text beside them
metadata.json also holds each split's ids, captions and languages (the "index"), so readers
get every caption without touching the features.

A pixel dataset (`pixels=True`: images from files, `sources.karpathy`) has instead of regions,
boxes:
  filename    text, the image's path relative to the source image directory
  image       the encoded image file (JPEG / PNG bytes), decoded when read
  image_size  [2] int32 (width, height) of the upright image
and its index also lists `filenames`; metadata.json says "kind": "pixels". A build writes under a temporary directory
next to the target and renames it into place only when every split succeeded, so a failed
prepare leaves no dataset directory behind. The temporary directory's name carries its writer's
host and pid (`.NAME-incomplete-HOST-PID-xxxx`), so the next build of NAME can tell the
leftovers of a killed build (pid gone) from one still running, and removes only the former.
"""

import collections
import logging
import os
import re
import shutil
import socket
import tempfile
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from rerank import paths
from rerank.data.sources import common

VERSION = "1.0.0"
DTYPES = {"float16": np.float16, "float32": np.float32}


def features(dtype: str) -> tfds.features.FeaturesDict:
  # Raw-bytes encoding: a float list in the proto would widen float16 and is ~10x slower.
  return tfds.features.FeaturesDict({
      "image_id": tfds.features.Text(),
      "regions": tfds.features.Tensor(shape=(None, common.REGION_DIM), dtype=DTYPES[dtype],
                                      encoding="bytes"),
      "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32, encoding="bytes"),
      "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "languages": tfds.features.Sequence(tfds.features.Text()),
  })


def pixel_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image_id": tfds.features.Text(),
      "filename": tfds.features.Text(),
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # raw bytes, no codec here
      "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "languages": tfds.features.Sequence(tfds.features.Text()),
  })


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic builder; `build` makes a named subclass per dataset."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, splits: dict[str, Callable[[], Iterator[common.Image]]], dtype: str,
               problems: common.Problems, nested: dict[str, str] | None = None, **kwargs):
    self._splits, self._dtype, self._problems = splits, dtype, problems
    self._nested = nested or {}  # split -> the split it is drawn from (test1k -> test)
    # canonical id -> (image id, split) of its first record: an image in two splits would
    # leak, and `12` / `012` are one image once read as numbers (`prepared.numeric_ids`).
    self._seen = {}
    self.captions = collections.Counter()  # split -> captions written
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=features(self._dtype),
                                 disable_shuffling=True, metadata=tfds.core.MetadataDict(),
                                 description=f"{self.name} regions ({self._dtype}) and captions")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split=None):
    dtype = DTYPES[self._dtype]
    for i, im in enumerate(self._splits[split]()):
      if not self._first_record(im.image_id, split):
        continue
      regions = im.regions.astype(dtype)
      if not np.isfinite(regions).all():
        self._problems.bad("non_finite", f"image id {im.image_id}", f"region values overflow "
                           f"{self._dtype} (max |value| {np.abs(im.regions).max():g}); prepare "
                           f"with --dtype=float32")
        continue
      self.captions[split] += len(im.captions)
      index = self.info.metadata.setdefault("index", {}).setdefault(
          split, {"image_ids": [], "captions": [], "languages": []})
      index["image_ids"].append(im.image_id)
      index["captions"].append(list(im.captions))
      index["languages"].append(list(im.languages))
      yield i, {"image_id": im.image_id, "regions": regions,
                "boxes": np.asarray(im.boxes, np.float32),
                "image_size": np.asarray(im.image_size, np.int32),
                "captions": im.captions, "languages": im.languages}

  def _first_record(self, image_id: str, split: str) -> bool:
    """Reports (and returns False for) an id seen before in another split, or spelled
    differently; an image of a nested split (test1k in test) is expected twice."""
    first_id, first = self._seen.setdefault(common.canonical_id(image_id), (image_id, split))
    if first_id == image_id and first in (split, self._nested.get(split)):
      return True
    if first_id == image_id and self._nested.get(first) == split:
      return True
    if first_id == image_id:
      reason = f"is in split {first!r} and in split {split!r}"
    else:
      reason = (f"and image id {first_id} (split {first!r}) are one image once ids are read as "
                f"numbers")
    self._problems.bad("duplicate_id", f"image id {image_id}", reason)
    return False


class _PixelBuilder(_Builder, skip_registration=True):
  """Encoded images and captions (`common.PixelImage` streams); `build(..., pixels=True)`."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=pixel_features(), disable_shuffling=True,
                                 metadata=tfds.core.MetadataDict(kind="pixels"),
                                 description=f"{self.name} encoded images and captions")

  def _generate_examples(self, split=None):
    for i, im in enumerate(self._splits[split]()):
      if not self._first_record(im.image_id, split):
        continue
      self.captions[split] += len(im.captions)
      index = self.info.metadata.setdefault("index", {}).setdefault(
          split, {"image_ids": [], "captions": [], "languages": [], "filenames": []})
      index["image_ids"].append(im.image_id)
      index["captions"].append(list(im.captions))
      index["languages"].append(list(im.languages))
      index["filenames"].append(im.filename)
      yield i, {"image_id": im.image_id, "filename": im.filename, "image": im.data,
                "image_size": np.asarray(im.image_size, np.int32),
                "captions": im.captions, "languages": im.languages}


def dataset_dir(data_dir: str, name: str) -> str:
  return paths.join(data_dir, name, VERSION)  # local or gs://


def build(name: str, splits: dict[str, Callable[[], Iterator[common.Image]]], data_dir: str,
          dtype: str, problems: common.Problems, overwrite: bool = False,
          nested: dict[str, str] | None = None, pixels: bool = False) -> dict:
  """Writes `data_dir/name/VERSION`; returns {split: {"images": n, "captions": m}}.

  `splits` yield `common.Image`s, or with `pixels` `common.PixelImage`s (`dtype` unused).
  Raises FileExistsError if the dataset exists (unless `overwrite`); on any error nothing
  is left behind (the partial build lives in a temporary directory until it is complete).
  """
  final = dataset_dir(data_dir, name)
  remove_stale(data_dir, name)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"{final} already exists; pass --overwrite to rebuild it")
  created = [d for d in (data_dir, os.path.dirname(final)) if not os.path.exists(d)]
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}-incomplete-{_owner()}-", dir=data_dir)
  try:
    base = _PixelBuilder if pixels else _Builder
    cls = type(_class_name(name), (base,), {"name": name, "__module__": __name__},
               skip_registration=True)
    builder = cls(splits=splits, dtype=dtype, problems=problems, nested=nested, data_dir=tmp,
                  file_format="array_record")
    builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
    counts = {s: {"images": int(builder.info.splits[s].num_examples),
                  "captions": int(builder.captions[s])} for s in splits}
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):  # --overwrite: the old copy goes only once the new one is whole
      old = tempfile.mkdtemp(prefix=f".{name}-old-{_owner()}-", dir=data_dir)
      os.rename(final, os.path.join(old, VERSION))
      os.rename(dataset_dir(tmp, name), final)
      shutil.rmtree(old)
    else:
      os.rename(dataset_dir(tmp, name), final)
    return counts
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    for d in reversed(created):  # and no empty directory this call created
      if os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"  # no "-" inside


def _owner() -> str:
  """`HOST-PID` of this process, for temporary directory names."""
  return f"{_host()}-{os.getpid()}"


def _writer_gone(dirname: str, prefix: str) -> bool | None:
  """True if the build that named `dirname` (`PREFIX HOST-PID-xxxx`) ran on this host and its
  process is gone, False if it is alive, None if the name cannot tell (another host, or an
  older version's name without an owner)."""
  parts = dirname[len(prefix):].rsplit("-", 2)
  if len(parts) != 3 or not parts[1].isdigit() or parts[0] != _host():
    return None
  try:
    os.kill(int(parts[1]), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OverflowError):  # another user's live process; an absurd pid
    return False
  return False


def remove_stale(data_dir: str, name: str) -> list[str]:
  """Removes what killed builds of `name` left in `data_dir`; returns the paths removed.

  `.NAME-incomplete-*`: a partial build, deleted. `.NAME-old-*`: the previous dataset, moved
  aside by `--overwrite` just before the new one was renamed into place; put back if the kill
  came between the two renames (no dataset at the target), else deleted. Directories of a
  build still running (its pid alive) are left alone, and so, with a warning, are those whose
  name cannot tell (another host's, or an older version's without an owner).
  """
  if not os.path.isdir(data_dir):
    return []
  handled = []
  for kind in ("incomplete", "old"):
    prefix = f".{name}-{kind}-"
    for entry in sorted(os.listdir(data_dir)):
      path = os.path.join(data_dir, entry)
      if not entry.startswith(prefix) or not os.path.isdir(path):
        continue
      gone = _writer_gone(entry, prefix)
      if gone is None:
        logging.warning("left %s alone: cannot tell whether the prepare that wrote it is "
                        "still running; delete it if none is", path)
      if not gone:
        continue
      saved = os.path.join(path, VERSION)
      final = dataset_dir(data_dir, name)
      if kind == "old" and os.path.isdir(saved) and not os.path.exists(final):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(saved, final)
        logging.warning("restored %s from %s (an --overwrite prepare was killed)", final, path)
      shutil.rmtree(path, ignore_errors=True)
      handled.append(path)
  return handled


def _class_name(name: str) -> str:
  return "".join(p.capitalize() for p in name.split("_")) or "Dataset"


def open_split(data_dir: str, name: str, split: str, with_index: bool = False):
  """Random-access source of a prepared split: `len(src)`, `src[i]` -> dict of numpy arrays.

  With `with_index`, also the split's caption index from metadata.json: {"image_ids": [N],
  "captions": [N][C], "languages": [N][C]} in record order, so captions are read without
  reading the region features of every record.
  """
  path = dataset_dir(data_dir, name)
  if not paths.exists(paths.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"no prepared dataset at {path}; run python -m rerank.data.prepare "
                            f"--dataset={name} --source_dir=... --data_dir={data_dir}")
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise KeyError(f"{path}: no split {split!r}; found {sorted(builder.info.splits)}")
  source = builder.as_data_source(split)
  if not with_index:
    return source
  index = (builder.info.metadata or {}).get("index", {}).get(split)
  if index is None or len(index["image_ids"]) != len(source):
    raise ValueError(f"{path}: metadata.json has no caption index for split {split!r} that "
                     f"matches its {len(source)} records; prepare it again")
  return source, index


def quiet():
  """No per-split progress bars or INFO lines: prepare prints its own one-line summary."""
  tfds.disable_progress_bar()
  logging.getLogger("absl").setLevel(logging.WARNING)
