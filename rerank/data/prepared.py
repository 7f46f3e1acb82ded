"""Reads a prepared (TFDS array_record) split as model-ready `RetrievalData`.

Captions come from the dataset's caption index (metadata.json) and are tokenised up front
([T, L] int32 is small); region features stay on disk and are read per batch by record
index, truncated to the configured number of regions and zero-padded, so a 40 GB training
split needs no more RAM than a batch.
"""

import concurrent.futures
import os
import threading

import numpy as np
import tokenizers
from tokenizers import normalizers, pre_tokenizers, processors

from rerank.data import batches
from rerank.data import images
from rerank.data import tfds_builders
from rerank.data.sources import SOURCES


def resolve_split(name: str, split: str) -> str:
  """`dev` (what the trainer asks for) -> the dataset's model-selection split."""
  if name in SOURCES and split == "dev" and "dev" not in SOURCES[name].SPLITS:
    return SOURCES[name].DEV_SPLIT
  return split


class RegionReader:
  """rows [B] -> (regions [B, R, 2054] float32, mask [B, R] bool): the first R stored regions."""

  def __init__(self, source, records: np.ndarray, max_regions: int):
    self.source, self.records, self.max_regions = source, records, max_regions
    # The previous call's regions: a CE batch right after a BE batch re-reads its images.
    self._last = {}
    self._lock = threading.Lock()

  def __call__(self, rows):
    rows = np.asarray(rows, np.int64).reshape(-1)
    out = np.zeros((rows.size, self.max_regions, 2054), np.float32)
    mask = np.zeros((rows.size, self.max_regions), bool)
    uniq, inverse = np.unique(self.records[rows], return_inverse=True)  # CE batches repeat images
    with self._lock:
      last = self._last
    missing = [int(r) for r in uniq if int(r) not in last]
    got = dict(zip(missing, (ex["regions"][:self.max_regions] for ex in _get(self.source, missing))))
    regions = [last[int(r)] if int(r) in last else got[int(r)] for r in uniq]
    for i, j in enumerate(inverse):
      out[i, :len(regions[j])] = regions[j]
      mask[i, :len(regions[j])] = True
    with self._lock:
      self._last = dict(zip(uniq.tolist(), regions))
    return out, mask


def _get(source, indices: list[int]) -> list[dict]:
  if hasattr(source, "__getitems__"):  # one batched read instead of one per record
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def read_captions(index: dict, language: str = "", num_images: int | None = None):
  """(image_ids [N] str, captions [T], caption_image [T], record index [N]) in stored order.

  `index` is the split's caption index (`tfds_builders.open_split(..., with_index=True)`).
  With `language`, only captions in that language count, and images without one are left out.
  """
  image_ids, captions, caption_image, records = [], [], [], []
  n = len(index["image_ids"]) if num_images is None else min(num_images, len(index["image_ids"]))
  for i in range(n):
    caps = [c for c, lang in zip(index["captions"][i], index["languages"][i])
            if not language or lang == language]
    if not caps:
      continue
    captions += caps
    caption_image += [len(image_ids)] * len(caps)
    image_ids.append(index["image_ids"][i])
    records.append(i)
  return image_ids, captions, np.asarray(caption_image, np.int32), np.asarray(records, np.int64)


def numeric_ids(image_ids: list[str]) -> np.ndarray:
  """int64 ids: the source ids where all are integers (COCO, Flickr30k), else row numbers."""
  if all(i.isascii() and i.isdigit() for i in image_ids):  # int() also takes '١٢'; '²' not
    return np.asarray([int(i) for i in image_ids], np.int64)
  return np.arange(len(image_ids), dtype=np.int64)


def read_split(config, split: str, tokenizer, tokenize, num_images=None):
  """(RetrievalData, captions) of a prepared split; see `datasets.load_split`."""
  ds = config.dataset
  split = resolve_split(ds.name, split)
  source, index = tfds_builders.open_split(ds.data_dir, ds.name, split, with_index=True)
  ids, captions, caption_image, records = read_captions(index, ds.get("language", ""), num_images)
  if not captions:
    raise ValueError(f"{ds.data_dir}/{ds.name} split {split!r}: no captions"
                     + (f" in language {ds.language!r}" if ds.get("language") else ""))
  token_ids, mask = tokenize(tokenizer, captions, config.max_text_len)
  data = batches.RetrievalData(
      token_ids=token_ids, text_mask=mask, caption_image=caption_image,
      image_ids=numeric_ids(ids), region_features=RegionReader(source, records, config.max_regions))
  return data, captions


class PixelReader:
  """rows [B] -> (images [B, H, W, 3] float32, mask [B, H, W] bool): the stored image files of
  the rows, decoded and preprocessed with `spec` (deterministic: no random augmentation).

  `filenames[row]` is the file an image row came from (relative to the prepare's image
  directory), so search results can name it.
  """

  def __init__(self, source, records: np.ndarray, spec: images.ImageSpec, filenames: list[str],
               threads: int = 4):
    self.source, self.records, self.spec, self.filenames = source, records, spec, filenames
    self.threads = max(1, threads)
    self._pool = None  # made on first use: constructing a reader stays free
    # the previous call's resized uint8 pixels: a CE batch right after a BE batch re-reads them
    self._last = {}
    self._lock = threading.Lock()

  def __call__(self, rows):
    rows = np.asarray(rows, np.int64).reshape(-1)
    uniq, inverse = np.unique(rows, return_inverse=True)
    with self._lock:
      last = self._last
    missing = [int(r) for r in uniq if int(r) not in last]
    got = dict(zip(missing, self._resized(missing)))
    done = {int(r): last[int(r)] if int(r) in last else got[int(r)] for r in uniq}
    with self._lock:
      self._last = done
    return images.normalize([done[int(uniq[j])] for j in inverse], self.spec)

  def _resized(self, rows: list[int]) -> list[np.ndarray]:
    """Resized pixels uint8 [h, w, 3] of image rows, decoded on a few threads (Pillow releases
    the GIL while decoding and resizing)."""
    if not rows:
      return []
    records = _get(self.source, [int(self.records[r]) for r in rows])

    def one(args):
      row, ex = args
      return images.resize(images.load_image(ex["image"], self.filenames[row]), self.spec)

    if self.threads == 1 or len(rows) == 1:
      return [one(a) for a in zip(rows, records)]
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads)
    return list(self._pool.map(one, zip(rows, records)))


def read_pixel_split(config, split: str, tokenizer, tokenize, spec: images.ImageSpec,
                     num_images=None):
  """(RetrievalData, captions) of a split prepared from image files; its `region_features` is a
  `PixelReader` (the model's image input: preprocessed pixels and mask)."""
  ds = config.dataset
  split = "val" if split == "dev" else split  # the trainer's dev split; Karpathy's val
  source, index = tfds_builders.open_split(ds.data_dir, ds.name, split, with_index=True)
  if "filenames" not in index:
    raise ValueError(f"config.dataset.name: {ds.data_dir}/{ds.name} holds region features, not "
                     f"images; pixel families (config.model.family={config.model.family!r}) read "
                     f"datasets prepared with python -m rerank.data.prepare --source=karpathy")
  ids, captions, caption_image, records = read_captions(index, ds.get("language", ""), num_images)
  if not captions:
    raise ValueError(f"{ds.data_dir}/{ds.name} split {split!r}: no captions")
  token_ids, mask = tokenize(tokenizer, captions, config.max_text_len)
  filenames = [index["filenames"][r] for r in records]
  data = batches.RetrievalData(
      token_ids=token_ids, text_mask=mask, caption_image=caption_image,
      image_ids=numeric_ids(ids), region_features=PixelReader(source, records, spec, filenames))
  return data, captions


def bert_tokenizer(path: str) -> tokenizers.Tokenizer:
  """A `tokenizer.json`, or an uncased BERT WordPiece from a `vocab.txt` (OSCAR's), as
  `[CLS] caption [SEP]`."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"config.dataset.tokenizer: expected a tokenizer.json or vocab.txt; "
                            f"found {path!r}")
  if path.endswith(".json"):
    return tokenizers.Tokenizer.from_file(path)
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(path, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
  return tok
