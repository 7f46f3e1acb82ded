"""synthetic_scenes as a source, so the generated dataset can be prepared like the real ones."""

import numpy as np

from rerank.data import synthetic_scenes
from rerank.data.sources import common

SPLITS = tuple(synthetic_scenes.SPLIT_SIZES)
DEV_SPLIT = "dev"
_CHUNK = 256


def check_files(source_dir: str, splits) -> None:
  del source_dir, splits  # generated, nothing to read


def read(split: str, seed: int = 0, num_images: int | None = None, family_size: int = 4,
         noise_std: float = synthetic_scenes.DEFAULT_NOISE_STD):
  """Yields the generated split's `Image`s; regions exactly as `Scenes.region_features` gives."""
  scenes = synthetic_scenes.generate(split, seed=seed, num_images=num_images,
                                     family_size=family_size, noise_std=noise_std)
  w, h = synthetic_scenes.IMAGE_W, synthetic_scenes.IMAGE_H
  for start in range(0, scenes.num_images, _CHUNK):
    rows = np.arange(start, min(start + _CHUNK, scenes.num_images))
    regions, mask = scenes.region_features(rows)
    for i, row in enumerate(rows):
      n = int(mask[i].sum())
      caps = [scenes.captions[t] for t in range(row * synthetic_scenes.CAPTIONS_PER_IMAGE,
                                                (row + 1) * synthetic_scenes.CAPTIONS_PER_IMAGE)]
      yield common.Image(image_id=str(scenes.image_ids[row]), regions=regions[i, :n],
                         boxes=regions[i, :n, 2048:2052].copy(), image_size=(w, h),
                         captions=caps, languages=["en"] * len(caps))
