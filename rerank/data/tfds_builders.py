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
get every caption without touching the features. A build writes under a temporary directory next to the target and renames it into place
only when every split succeeded, so a failed prepare leaves no dataset directory behind.
"""

import collections
import logging
import os
import shutil
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


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic builder; `build` makes a named subclass per dataset."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, splits: dict[str, Callable[[], Iterator[common.Image]]], dtype: str,
               problems: common.Problems, nested: dict[str, str] | None = None, **kwargs):
    self._splits, self._dtype, self._problems = splits, dtype, problems
    self._nested = nested or {}  # split -> the split it is drawn from (test1k -> test)
    self._seen = {}  # image id -> first split: an image in two splits would leak
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
      first = self._seen.setdefault(im.image_id, split)
      if first != split and self._nested.get(split) != first and self._nested.get(first) != split:
        self._problems.bad("duplicate_id", f"image id {im.image_id}",
                           f"is in split {first!r} and in split {split!r}")
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


def dataset_dir(data_dir: str, name: str) -> str:
  return paths.join(data_dir, name, VERSION)  # local or gs://


def build(name: str, splits: dict[str, Callable[[], Iterator[common.Image]]], data_dir: str,
          dtype: str, problems: common.Problems, overwrite: bool = False,
          nested: dict[str, str] | None = None) -> dict:
  """Writes `data_dir/name/VERSION`; returns {split: {"images": n, "captions": m}}.

  Raises FileExistsError if the dataset exists (unless `overwrite`); on any error nothing
  is left behind (the partial build lives in a temporary directory until it is complete).
  """
  final = dataset_dir(data_dir, name)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"{final} already exists; pass --overwrite to rebuild it")
  created = [d for d in (data_dir, os.path.dirname(final)) if not os.path.exists(d)]
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}-incomplete-", dir=data_dir)
  try:
    cls = type(_class_name(name), (_Builder,), {"name": name, "__module__": __name__},
               skip_registration=True)
    builder = cls(splits=splits, dtype=dtype, problems=problems, nested=nested, data_dir=tmp,
                  file_format="array_record")
    builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
    counts = {s: {"images": int(builder.info.splits[s].num_examples),
                  "captions": int(builder.captions[s])} for s in splits}
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):  # --overwrite: the old copy goes only once the new one is whole
      old = tempfile.mkdtemp(prefix=f".{name}-old-", dir=data_dir)
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
