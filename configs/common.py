"""What every config file shares: the `file.py:key=value,flag` argument parser and model sizes."""

import ml_collections

# Encoder sizes by name: (hidden, layers, heads, mlp).
SIZES = {
    "tiny": (64, 2, 2, 128),
    "mini": (128, 2, 4, 512),
    "small": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "runlocal,size=small" into a ConfigDict over `defaults` (bare names mean True).

  Values are converted to the type of their default; an unknown key is an error that lists
  the known ones.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; expected one of {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes", "y")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return ml_collections.ConfigDict(out)


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """The `config.model` block for a named size; `overrides` replace single fields.

  The one place configs set the region width: a 2048-wide detector feature plus OSCAR's 6 box
  values (x1, y1, x2, y2, w, h, divided by the image size), as every prepared dataset stores it.
  """
  if size not in SIZES:
    raise ValueError(f"model size {size!r} unknown; expected one of {sorted(SIZES)}")
  hidden, layers, heads, mlp = SIZES[size]
  cfg = ml_collections.ConfigDict(dict(
      hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_dim=mlp,
      max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
      dropout_rate=0.1, attention_dropout_rate=0.1, hidden_act="gelu",
      feature_dim=2048, box_dim=6, visual="oscar", visual_layernorm=False,
      order="text_first", dtype="float32", remat=False, head_dropout=0.1))
  cfg.update(overrides)
  return cfg
