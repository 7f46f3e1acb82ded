"""Training batches for the bi-encoder and the cross-encoder, a pure function of (seed, step).

A retrieval split is captions pointing at images (`caption_image[t]` = image row of caption t).
Each epoch visits every caption once in a seeded permutation; the batch at global step s is
computed from (seed, s) alone, so resuming mid-epoch needs nothing but the step number.

- BE batch: B captions, their images and image ids (the loss masks same-image pairs).
- CE batch: for each caption 1 positive pair (caption, its image) and 1 negative pair: with
  p=0.5 a random other image, else a random caption of another image paired with this
  caption's image (as the authors' code). Pairs are laid out [positives; negatives] -> 2B.
  Options: a BE-mined image (`mined`, `hard_prob`) or one of the dataset's known confusers
  of the caption's image (`confuser_prob`) replaces the negative.
"""

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class RetrievalData:
  """A split in model-ready form: tokenised captions plus an image feature lookup."""

  token_ids: np.ndarray       # [T, L] int32
  text_mask: np.ndarray       # [T, L] bool
  caption_image: np.ndarray   # [T] int32 image row of each caption
  image_ids: np.ndarray       # [N] int64
  # rows [B] -> (regions [B, R, F+box] float32, region_mask [B, R] bool)
  region_features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  # [N, K] image rows known NOT to match any caption of the row's image (synthetic_scenes: the
  # family siblings), or None. Safe hard negatives: unlike mined ones they are never false.
  confusers: np.ndarray | None = None

  def __post_init__(self):
    t = len(self.caption_image)
    if self.token_ids.shape[0] != t or self.text_mask.shape != self.token_ids.shape:
      raise ValueError(f"RetrievalData: token_ids {self.token_ids.shape} and text_mask "
                       f"{self.text_mask.shape} must have one row per caption ({t})")
    if t and not 0 <= self.caption_image.min() <= self.caption_image.max() < len(self.image_ids):
      raise ValueError(f"RetrievalData: caption_image must index the {len(self.image_ids)} images; "
                       f"found values in [{self.caption_image.min()}, {self.caption_image.max()}]")

    if self.confusers is not None and (self.confusers.ndim != 2
                                       or self.confusers.shape[0] != len(self.image_ids)):
      raise ValueError(f"RetrievalData: confusers must be [num_images={len(self.image_ids)}, K]; "
                       f"found shape {self.confusers.shape}")

  @property
  def num_texts(self) -> int:
    return len(self.caption_image)

  @property
  def num_images(self) -> int:
    return len(self.image_ids)


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


class LazyRows:
  """A batch leaf whose rows are computed only when indexed: `x[idx]` featurises just the rows
  in idx[0]. `sharding.shard_batch` indexes each device's slice, so on several hosts every
  process reads the region features of its own rows only, while the choice of rows and
  negatives (cheap, index-level) stays global and identical on every process."""

  def __init__(self, rows: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], shape, dtype):
    self.rows, self.fn = rows, fn
    self.shape, self.dtype = (len(rows), *shape), np.dtype(dtype)

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    return self.fn(self.rows[idx[0]])[(slice(None), *idx[1:])]

  def __array__(self, dtype=None, copy=None):
    out = self.fn(self.rows)
    return out if dtype is None else out.astype(dtype)


def region_leaves(data: RetrievalData, img_rows: np.ndarray, lazy: bool):
  """(regions, region_mask) of image rows: arrays, or `LazyRows` sharing one featurisation per
  requested slice."""
  if not lazy:
    return data.region_features(img_rows)
  if "_region_probe" not in data.__dict__:  # shapes/dtypes of one row, read once per split
    object.__setattr__(data, "_region_probe", data.region_features(img_rows[:1]))
  probe, probe_mask = data.__dict__["_region_probe"]
  last = {}

  def features(rows):  # the mask leaf asks for the same slice right after the regions leaf
    key = rows.tobytes()
    if key not in last:
      last.clear()
      last[key] = data.region_features(rows)
    return last[key]

  return (LazyRows(img_rows, lambda r: features(r)[0], probe.shape[1:], probe.dtype),
          LazyRows(img_rows, lambda r: features(r)[1], probe_mask.shape[1:], probe_mask.dtype))


def caption_rows(num_texts: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Caption indices [B] of global step `step`: epoch-wise seeded permutations, no caption dropped."""
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start, num_texts)
    perm = _rng(seed, 0, epoch).permutation(num_texts)
    take = perm[offset:offset + batch_size - len(out)]
    out.extend(take.tolist())
    start += len(take)
  return np.asarray(out, np.int64)


def be_batch(data: RetrievalData, rows: np.ndarray,
             negatives: np.ndarray | None = None, lazy: bool = False) -> dict[str, np.ndarray]:
  """B captions and their images; with `negatives` ([B, n] image rows) also their regions,
  laid out caption by caption ([B * n, R, F]) for the sampled-triplet loss."""
  img_rows = data.caption_image[rows]
  regions, region_mask = region_leaves(data, img_rows, lazy)
  out = {"token_ids": data.token_ids[rows], "text_mask": data.text_mask[rows],
         "regions": regions, "region_mask": region_mask,
         "image_ids": data.image_ids[img_rows]}
  if negatives is not None:
    out["neg_regions"], out["neg_region_mask"] = region_leaves(data, negatives.reshape(-1), lazy)
  return out


def be_negatives(data: RetrievalData, rows: np.ndarray, rng: np.random.Generator, num: int,
                 mined: dict | None = None) -> np.ndarray:
  """[B, num] negative image rows per caption: draws from its mined list (`rerank.mining`) where
  it has one, else random images of another id (so shapes stay static before mining starts)."""
  out = np.empty((len(rows), num), np.int64)
  for i, r in enumerate(rows):
    own = data.image_ids[data.caption_image[r]]
    if mined is not None and int(r) in mined and len(mined[int(r)]):
      out[i] = rng.choice(mined[int(r)], num)
      continue
    for j in range(num):
      c = data.caption_image[r]
      while data.image_ids[c] == own:
        c = rng.integers(data.num_images)
      out[i, j] = c
  return out


def ce_batch(data: RetrievalData, rows: np.ndarray, rng: np.random.Generator,
             mined: dict | None = None, hard_prob: float = 0.0,
             confuser_prob: float = 0.0, lazy: bool = False) -> dict[str, np.ndarray]:
  """2B pairs: [positives; negatives] with labels [1]*B + [0]*B.

  With `mined` (caption row -> [K] image rows of hard negatives, see `rerank.mining`), each
  caption takes one of its mined images as the negative with probability `hard_prob`; else,
  with probability `confuser_prob`, one of its image's `data.confusers`.
  """
  b = len(rows)
  if data.num_images < 2 or (data.image_ids == data.image_ids[0]).all():
    raise ValueError("CE batches need at least two distinct images for negatives")
  img_rows = data.caption_image[rows]
  neg_img = img_rows.copy()
  neg_txt = rows.copy()
  swap_image = rng.random(b) < 0.5
  use_mined = rng.random(b) < hard_prob
  if confuser_prob and data.confusers is None:
    raise ValueError("confuser_prob > 0 needs a dataset with known confusers "
                     "(RetrievalData.confusers is None)")
  use_confuser = rng.random(b) < confuser_prob
  for i in range(b):
    own = data.image_ids[img_rows[i]]
    if use_mined[i] and mined is not None and int(rows[i]) in mined:
      neg_img[i] = rng.choice(mined[int(rows[i])])
    elif use_confuser[i] and data.confusers.shape[1]:
      neg_img[i] = rng.choice(data.confusers[img_rows[i]])
    elif swap_image[i]:
      # A random other image (by id: two rows may share an id in merged corpora).
      while data.image_ids[neg_img[i]] == own:
        neg_img[i] = rng.integers(data.num_images)
    else:
      while data.image_ids[data.caption_image[neg_txt[i]]] == own:
        neg_txt[i] = rng.integers(data.num_texts)
  txt = np.concatenate([rows, neg_txt])
  img = np.concatenate([img_rows, neg_img])
  regions, region_mask = region_leaves(data, img, lazy)
  return {"token_ids": data.token_ids[txt], "text_mask": data.text_mask[txt],
          "regions": regions, "region_mask": region_mask,
          "labels": np.concatenate([np.ones(b, np.int32), np.zeros(b, np.int32)])}


def ce_group_batch(data: RetrievalData, rows: np.ndarray, rng: np.random.Generator,
                   group: int, num_confusers: int = 0,
                   lazy: bool = False) -> dict[str, np.ndarray]:
  """B*G pairs for a listwise CE loss: caption b with its image first, then G-1 negative images.

  Negatives: `num_confusers` of the image's known confusers (without replacement), then random
  other images. Pairs are laid out group by group: [b0 pos, b0 neg..., b1 pos, ...].
  """
  b = len(rows)
  if group < 2:
    raise ValueError(f"a CE group needs a positive and at least one negative; found group={group}")
  if num_confusers and (data.confusers is None or data.confusers.shape[1] < num_confusers):
    have = 0 if data.confusers is None else data.confusers.shape[1]
    raise ValueError(f"{num_confusers} confusers per CE group asked for; the dataset has {have}")
  if num_confusers >= group:
    raise ValueError(f"num_confusers={num_confusers} must be below the group size {group}")
  if data.num_images < 2 or (data.image_ids == data.image_ids[0]).all():
    raise ValueError("CE batches need at least two distinct images for negatives")
  img_rows = data.caption_image[rows]
  cand = np.empty((b, group), np.int64)  # [B, G] image rows
  for i in range(b):
    own = data.image_ids[img_rows[i]]
    cand[i, 0] = img_rows[i]
    if num_confusers:
      cand[i, 1:1 + num_confusers] = rng.choice(data.confusers[img_rows[i]], num_confusers,
                                                replace=False)
    for j in range(1 + num_confusers, group):
      r = img_rows[i]
      while data.image_ids[r] == own:
        r = rng.integers(data.num_images)
      cand[i, j] = r
  txt = np.repeat(rows, group)
  regions, region_mask = region_leaves(data, cand.reshape(-1), lazy)
  return {"token_ids": data.token_ids[txt], "text_mask": data.text_mask[txt],
          "regions": regions, "region_mask": region_mask}


def train_batch(data: RetrievalData, parts: tuple[str, ...], batch_size: int, seed: int, step: int,
                mined: dict | None = None, hard_prob: float = 0.0,
                confuser_prob: float = 0.0, ce_group: dict | None = None,
                num_be_negatives: int = 0, lazy: bool = False) -> dict:
  """Everything one training step needs: the `parts` of ("be", "ce") its mode trains.

  `ce_group` = dict(captions=, size=, confusers=) switches the CE batch to `ce_group_batch`
  over the first `captions` captions of the step. `num_be_negatives` > 0 adds that many
  (mined, else random) negative images per caption to the BE batch (`be_negatives`).
  `lazy`: region features as `LazyRows`, read per device slice by `sharding.shard_batch`.
  """
  rows = caption_rows(data.num_texts, batch_size, seed, step)
  out = {}
  if "be" in parts:
    negatives = (be_negatives(data, rows, _rng(seed, 3, step), num_be_negatives, mined)
                 if num_be_negatives else None)
    out["be"] = be_batch(data, rows, negatives, lazy)
  if "ce" in parts and ce_group:
    out["ce"] = ce_group_batch(data, rows[:ce_group["captions"]], _rng(seed, 1, step),
                               ce_group["size"], ce_group["confusers"], lazy)
  elif "ce" in parts:
    out["ce"] = ce_batch(data, rows, _rng(seed, 1, step), mined, hard_prob, confuser_prob, lazy)
  return out
