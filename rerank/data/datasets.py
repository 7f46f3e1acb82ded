"""Dataset registry: config -> tokenizer and model-ready splits (`batches.RetrievalData`).

With `config.dataset.data_dir` set, the split is read from the TFDS dataset that
`python -m rerank.data.prepare` wrote there (`rerank.data.prepared`): coco_oscar,
flickr30k_butd, multi30k, cc_dev, or a prepared synthetic_scenes. Without it,
synthetic_scenes is generated in memory (no prepare step, as in the demo); for a pixel family
(`config.model.family` vilt or blip) its scenes are rendered as images, batch by batch.
"""

import os

import numpy as np
import tokenizers

from rerank.data import batches
from rerank.data import images
from rerank.data import prepared
from rerank.data import synthetic_scenes


def tokenize(tokenizer: tokenizers.Tokenizer, texts: list[str], max_len: int):
  """Texts -> (ids [N, max_len] int32, mask [N, max_len] bool), truncated and right-padded.

  Fixed length keeps every jitted shape static. Truncation keeps the final [SEP].
  """
  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # no shared padding state
  tok.enable_truncation(max_len)
  pad = "[PAD]" if tok.token_to_id("[PAD]") is not None else "<pad>"  # BERT vs XLM-R vocabularies
  tok.enable_padding(length=max_len, pad_id=tok.token_to_id(pad) or 0, pad_token=pad)
  enc = tok.encode_batch(texts)
  ids = np.asarray([e.ids for e in enc], np.int32).reshape(len(texts), max_len)
  mask = np.asarray([e.attention_mask for e in enc], bool).reshape(len(texts), max_len)
  return ids, mask


def _synthetic_scenes(config, split: str, tokenizer, num_images=None):
  ds = config.dataset
  scenes = synthetic_scenes.generate(
      split, seed=ds.seed, num_images=num_images, family_size=ds.family_size,
      noise_std=ds.noise_std, min_objects=ds.get("min_objects", 2),
      max_objects=ds.get("max_objects", synthetic_scenes.MAX_REGIONS))
  ids, mask = tokenize(tokenizer, scenes.captions, config.max_text_len)
  data = batches.RetrievalData(
      token_ids=ids, text_mask=mask, caption_image=np.asarray(scenes.caption_image, np.int32),
      image_ids=scenes.image_ids, region_features=_image_input(config, scenes),
      confusers=scenes.siblings())
  return data, scenes.captions


def _image_input(config, scenes):
  """rows -> the model's image input: region features, or for a pixel family the rendered
  scenes (`config.dataset.image_size` pixels, default config.image.size) preprocessed as
  config.image says: (images [B, H, W, 3] float32, mask [B, H, W] bool)."""
  if _family(config) in ("regions", "", None):
    return scenes.region_features
  spec = images.ImageSpec.from_dict(config.image)
  return _RenderedScenes(scenes, config.dataset.get("image_size", 0) or spec.size, spec)


class _RenderedScenes:
  """Rendered, preprocessed scenes by row. A split whose inputs fit in CACHE_BYTES keeps each
  row once computed: evaluation asks for the same test images for every CE query."""

  CACHE_BYTES = 256 << 20

  def __init__(self, scenes, size: int, spec: images.ImageSpec):
    self.scenes, self.size, self.spec = scenes, size, spec
    height, width = spec.canvas
    fits = scenes.num_images * height * width * 4 * 4 <= self.CACHE_BYTES  # float32 x 3 + mask
    self.cache = (np.zeros((scenes.num_images, height, width, 3), np.float32),
                  np.zeros((scenes.num_images, height, width), bool),
                  np.zeros(scenes.num_images, bool)) if fits else None

  def __call__(self, rows):
    rows = np.asarray(rows, np.int64).reshape(-1)
    if self.cache is None:
      return self._compute(rows)
    pixels, mask, done = self.cache
    todo = np.unique(rows[~done[rows]])
    if todo.size:
      pixels[todo], mask[todo] = self._compute(todo)
      done[todo] = True
    return pixels[rows], mask[rows]

  def _compute(self, rows):
    return images.preprocess_array(synthetic_scenes.render(self.scenes, rows, self.size), self.spec)


LOADERS = {"synthetic_scenes": _synthetic_scenes}
TOKENIZERS = {"synthetic_scenes": synthetic_scenes.build_tokenizer}


def load_tokenizer(checkpoint: str) -> tokenizers.Tokenizer:
  """The tokenizer saved with a converted checkpoint: DIR/tokenizer/tokenizer.json, as
  `rerank.models.pretrained.save_converted` writes it (docs/DESIGN.md, section 3)."""
  return tokenizers.Tokenizer.from_file(os.path.join(checkpoint, "tokenizer", "tokenizer.json"))


def get_tokenizer(config) -> tokenizers.Tokenizer:
  """The dataset's tokenizer, or the converted checkpoint's when `config.init_from` is set."""
  if config.get("init_from"):
    return load_tokenizer(config.init_from)
  if config.dataset.name in TOKENIZERS:
    return TOKENIZERS[config.dataset.name]()
  return prepared.bert_tokenizer(config.dataset.get("tokenizer", ""))


def _family(config) -> str:
  """config.model.family: "regions" (also when absent), "vilt" or "blip"."""
  model = config.get("model") or {}
  return model.get("family", "regions") if hasattr(model, "get") else "regions"


def load_split(config, split: str, tokenizer, num_images=None):
  """Returns (RetrievalData, captions) of `split`; `num_images` shrinks it (None = full size)."""
  name = config.dataset.name
  if config.dataset.get("data_dir") and _family(config) in ("vilt", "blip"):
    return prepared.read_pixel_split(config, split, tokenizer, tokenize,
                                     images.ImageSpec.from_dict(config.get("image")), num_images)
  if config.dataset.get("data_dir"):
    if name not in prepared.SOURCES:
      raise ValueError(f"config.dataset.name: expected one of {sorted(prepared.SOURCES)}; "
                       f"found {name!r}")
    return prepared.read_split(config, split, tokenizer, tokenize, num_images)
  if name not in LOADERS:
    raise ValueError(f"config.dataset.name: {name!r} is read from a prepared TFDS dataset: set "
                     f"config.dataset.data_dir (see python -m rerank.data.prepare)")
  return LOADERS[name](config, split, tokenizer, num_images)
