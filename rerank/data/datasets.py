"""Dataset registry: config -> tokenizer and model-ready splits (`batches.RetrievalData`).

Only the built-in `synthetic_scenes` lives here for now; real datasets (COCO, Flickr30k,
Multi30k, CC) plug in by adding a loader to `LOADERS` with the same return shape.
"""

import numpy as np
import tokenizers

from rerank.data import batches
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
      noise_std=ds.noise_std)
  ids, mask = tokenize(tokenizer, scenes.captions, config.max_text_len)
  data = batches.RetrievalData(
      token_ids=ids, text_mask=mask, caption_image=np.asarray(scenes.caption_image, np.int32),
      image_ids=scenes.image_ids, region_features=scenes.region_features)
  return data, scenes.captions


LOADERS = {"synthetic_scenes": _synthetic_scenes}
TOKENIZERS = {"synthetic_scenes": synthetic_scenes.build_tokenizer}


def get_tokenizer(config) -> tokenizers.Tokenizer:
  """The dataset's tokenizer, or the converted checkpoint's when `config.init_from` is set."""
  if config.get("init_from"):
    from rerank.models import load  # pylint: disable=import-outside-toplevel
    return load.load_tokenizer(config.init_from)
  return TOKENIZERS[_name(config)]()


def load_split(config, split: str, tokenizer, num_images=None):
  """Returns (RetrievalData, captions) of `split`; `num_images` shrinks it (None = full size)."""
  return LOADERS[_name(config)](config, split, tokenizer, num_images)


def _name(config) -> str:
  name = config.dataset.name
  if name not in LOADERS:
    raise ValueError(f"config.dataset.name: expected one of {sorted(LOADERS)}; found {name!r}")
  return name
