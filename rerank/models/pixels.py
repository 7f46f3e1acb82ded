"""The pixel-input families (ViLT, BLIP): which module builds each, and what they share.

Region families (OSCAR, M3P, UNITER, BERT) read detector features through
`rerank.models.encoder`; pixel families read images. Each pixel family is one module,
`rerank/models/<family>.py`, with the same small surface (docs/DESIGN.md, "Pixel families"):

  Config             frozen dataclass; `Config.from_dict(d)`; property `embed_dim`
  Model(cfg, head_dropout)
                     flax Module: embed_text, embed_image, score_pairs, __call__ (init)
  example_images(cfg, batch)
                     zero images [batch, H, W, 3] float32 and an all-true mask [batch, H, W]

Their image input is (images [B, H, W, 3] float32, resized and normalised; image_mask
[B, H, W] bool, True on real pixels), where region families take (regions [B, R, F+box],
region_mask [B, R]): everything between the data and the model passes both through unchanged.
The modules are imported lazily so that region-family users never load them.
"""

import dataclasses
import importlib

FAMILIES = ("vilt", "blip")
REGIONS = "regions"  # config.model.family of the region families (also when absent)


def family_of(config) -> str:
  """`config.model.family`: "regions" (the default) or a pixel family."""
  family = config.model.get("family", REGIONS) or REGIONS
  if family != REGIONS and family not in FAMILIES:
    raise ValueError(f"config.model.family: expected one of {REGIONS}, {', '.join(FAMILIES)}; "
                     f"found {family!r}")
  return family


def is_pixel(config) -> bool:
  return family_of(config) != REGIONS


def module(family: str):
  """The module implementing pixel family `family` (rerank.models.vilt / rerank.models.blip)."""
  if family not in FAMILIES:
    raise ValueError(f"pixel family: expected one of {', '.join(FAMILIES)}; found {family!r}")
  return importlib.import_module(f"rerank.models.{family}")


def model_fields(config) -> dict:
  """config.model as keyword arguments of the family's Config (no family, no head_dropout)."""
  return {k: v for k, v in config.model.to_dict().items() if k not in ("family", "head_dropout")}


def config_from_dict(cls, d: dict, name: str):
  """`cls(**d)` for a family's Config dataclass; ValueError naming the first unknown field."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"model.{unknown[0]}: expected one of the {name} fields ({', '.join(sorted(known))}); "
                     "found an unknown field")
  return cls(**d)
