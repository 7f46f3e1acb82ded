"""Converting HF `BlipForImageTextRetrieval` weights into `rerank.models.blip.Model` parameters.

`convert(src, dst, ...)` reads SRC/config.json (BlipConfig: text_config, vision_config,
image_text_hidden_size), the weights (safetensors, or torch files through
`pretrained.read_state_dict`'s safe loader), the BERT WordPiece tokenizer with BLIP's added
special tokens, and preprocessor_config.json (BlipImageProcessor); checks every key and shape
in one error (`pretrained.build_params`) and writes the converted directory
(`pretrained.write_converted`): model.json {"family": "blip", "model": blip.Config fields,
"image": the preprocessing dict, "has_ce_head": true, ...}, params/ {"encoder": the whole
model tree, heads included}, tokenizer/. The key map is in docs/DESIGN.md, "BLIP".
"""

import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rerank.models import blip
from rerank.models import families
from rerank.models import pretrained
from rerank.models.pretrained import ConvertError, Entry

FAMILY = "blip"
RETRIEVAL = "BlipForImageTextRetrieval"  # the transformers class whose checkpoints we convert
# BlipImageProcessor's defaults (OpenAI CLIP statistics, bicubic), for a directory without
# preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# transformers' defaults for fields a saved BlipConfig may leave out.
_TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=512, layer_norm_eps=1e-12,
                      hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=384, patch_size=16, layer_norm_eps=1e-5, hidden_act="gelu")
# Checkpoint keys we read nothing from: the text position-id buffer older dumps carry, and a
# text pooler (BlipForImageTextRetrieval builds its text encoder without one).
_IGNORED = ("text_encoder.embeddings.position_ids", "text_encoder.pooler.")
_ACTIVATIONS = families._ACTIVATIONS  # pylint: disable=protected-access  (HF name -> ours, as BERT)


def model_config(config: dict, source: str) -> blip.Config:
  """blip.Config from a BlipConfig dict (config.json); ConvertError naming a bad field."""
  parts = {}
  for name in ("text_config", "vision_config"):
    part = config.get(name, {})
    if not isinstance(part, dict):
      raise ConvertError(f"{source}: {name}: expected a JSON object; found {json.dumps(part)[:80]}")
    families.check_config_types(part, f"{source}: {name}")
    parts[name] = part
  t = {**_TEXT_DEFAULTS, **parts["text_config"]}
  v = {**_VISION_DEFAULTS, **parts["vision_config"]}
  fields = {}
  for tower, prefix, c in (("text_config", "", t), ("vision_config", "vision_", v)):
    act = c["hidden_act"]
    if act not in _ACTIVATIONS:
      raise ConvertError(f"{source}: {tower}.hidden_act: expected one of {sorted(_ACTIVATIONS)}; found {act!r}")
    fields.update({prefix + "hidden_size": c["hidden_size"], prefix + "num_layers": c["num_hidden_layers"],
                   prefix + "num_heads": c["num_attention_heads"], prefix + "mlp_dim": c["intermediate_size"],
                   prefix + "layer_norm_eps": c["layer_norm_eps"],
                   prefix + "hidden_act": _ACTIVATIONS[act]})
  for name in ("image_size", "patch_size"):
    value = v[name]
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
      value = value[0]  # transformers also accepts [h, w]; BLIP's are square
    fields[name] = value
  fields.update(vocab_size=t["vocab_size"], max_position_embeddings=t["max_position_embeddings"],
                image_text_hidden_size=config.get("image_text_hidden_size", 256),
                dropout_rate=t["hidden_dropout_prob"], attention_dropout_rate=t["attention_probs_dropout_prob"])
  try:
    return blip.Config(**fields)
  except ValueError as e:
    raise ConvertError(f"{source}: {e}") from e


def expected_shapes(cfg: blip.Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shape of every parameter of `blip.Model(cfg)`, computed abstractly (no memory)."""
  images, mask = blip.example_images(cfg, 1)
  args = (jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), images, mask)
  tree = jax.eval_shape(lambda k: blip.Model(cfg).init(k, *args), jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree["params"]))[0]
  return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def _linear(path, key, n_in=1):
  return [Entry(path + ("kernel",), key + ".weight", "weight", n_in),
          Entry(path + ("bias",), key + ".bias", "bias")]


def _norm(path, key):
  return [Entry(path + ("scale",), key + ".weight"), Entry(path + ("bias",), key + ".bias")]


def entries(cfg: blip.Config) -> list[Entry]:
  """(our parameter path, checkpoint key, conversion) for every parameter of the model."""
  v, out = ("vision",), []
  e = "vision_model.embeddings."
  out += [Entry(v + ("class_embedding",), e + "class_embedding"),
          Entry(v + ("position_embedding",), e + "position_embedding"),
          # [Dv, 3, p, p] arrives reordered to [Dv, p*p*3] (`_patch_rows`).
          Entry(v + ("patch_embedding", "kernel"), e + "patch_embedding.weight", "weight", 3),
          Entry(v + ("patch_embedding", "bias"), e + "patch_embedding.bias", "bias")]
  for i in range(cfg.vision_num_layers):
    k, p = f"vision_model.encoder.layers.{i}.", v + (f"layer_{i}",)
    out += (_linear(p + ("qkv",), k + "self_attn.qkv")
            + _linear(p + ("projection",), k + "self_attn.projection", n_in=2)
            + _norm(p + ("layer_norm1",), k + "layer_norm1") + _norm(p + ("layer_norm2",), k + "layer_norm2")
            + _linear(p + ("fc1",), k + "mlp.fc1") + _linear(p + ("fc2",), k + "mlp.fc2"))
  out += _norm(v + ("post_layernorm",), "vision_model.post_layernorm")
  t, e = ("text",), "text_encoder.embeddings."
  out += [Entry(t + ("word_embeddings", "embedding"), e + "word_embeddings.weight"),
          Entry(t + ("position_embeddings", "embedding"), e + "position_embeddings.weight")]
  out += _norm(t + ("embeddings_norm",), e + "LayerNorm")
  for i in range(cfg.num_layers):
    k, p = f"text_encoder.encoder.layer.{i}.", t + (f"layer_{i}",)
    for block in ("attention", "crossattention"):
      for name in ("query", "key", "value"):
        out += _linear(p + (block, name), k + f"{block}.self.{name}")
      out += _linear(p + (block, "output"), k + f"{block}.output.dense", n_in=2)
      out += _norm(p + (block, "norm"), k + f"{block}.output.LayerNorm")
    out += (_linear(p + ("intermediate",), k + "intermediate.dense")
            + _linear(p + ("mlp_output",), k + "output.dense")
            + _norm(p + ("output_norm",), k + "output.LayerNorm"))
  for head in ("vision_proj", "text_proj", "itm_head"):
    out += _linear((head,), head)
  return out


def _reshape_state(state: dict, cfg: blip.Config) -> dict:
  """Brings three tensors to the 2-D/1-D layouts `build_params` compares (when they fit).

  The class and position embeddings carry a leading batch axis of 1; the patch convolution
  [Dv, 3, p, p] becomes rows [Dv, p*p*3] in our (row, column, channel) patch order. A tensor of
  another shape is left as it is, so the error shows the checkpoint's own shape.
  """
  e = "vision_model.embeddings."
  for key in (e + "class_embedding", e + "position_embedding"):
    if key in state and state[key].ndim == 3 and state[key].shape[0] == 1:
      state[key] = state[key][0]
  w = state.get(e + "patch_embedding.weight")
  p = cfg.patch_size
  if w is not None and w.ndim == 4 and w.shape[1:] == (3, p, p):
    state[e + "patch_embedding.weight"] = np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(w.shape[0], -1)
  return state


def image_settings(src_dir: str, cfg: blip.Config) -> tuple[dict, str]:
  """model.json's "image" (ImageSpec dict, kind "blip") from preprocessor_config.json, and a note."""
  path = os.path.join(src_dir, "preprocessor_config.json")
  if not os.path.isfile(path):
    spec = dict(kind="blip", size=cfg.image_size, mean=list(CLIP_MEAN), std=list(CLIP_STD), resample="bicubic")
    return spec, (f"no preprocessor_config.json in {src_dir}: BlipImageProcessor's defaults "
                  f"(size {cfg.image_size}, CLIP mean/std, bicubic)")
  c = pretrained.read_json_object(path)
  size = c.get("size", cfg.image_size)
  if isinstance(size, dict):
    size = size.get("height") if size.get("height") == size.get("width") else size
  if size != cfg.image_size:
    raise ConvertError(f"{path}: size: expected {cfg.image_size} (a square, vision_config.image_size); "
                       f"found {json.dumps(c.get('size'))[:80]}")
  if not c.get("do_resize", True):
    raise ConvertError(f"{path}: do_resize: expected true (the model needs {cfg.image_size}-pixel squares); "
                       "found false")
  normalise = c.get("do_normalize", True)
  mean = c.get("image_mean", list(CLIP_MEAN)) if normalise else [0.0, 0.0, 0.0]
  std = c.get("image_std", list(CLIP_STD)) if normalise else [1.0, 1.0, 1.0]
  for name, value in (("image_mean", mean), ("image_std", std)):
    if not (isinstance(value, list) and len(value) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
      raise ConvertError(f"{path}: {name}: expected 3 numbers; found {json.dumps(value)[:80]}")
  resample = c.get("resample", 3)
  resample = _RESAMPLE.get(resample, resample) if isinstance(resample, int) else resample
  if resample not in _RESAMPLE.values():
    raise ConvertError(f"{path}: resample: expected a Pillow filter (0-5 or a name); found {resample!r}")
  spec = dict(kind="blip", size=size, mean=[float(x) for x in mean], std=[float(x) for x in std],
              resample=resample)
  rescale = c.get("rescale_factor", 1 / 255) if c.get("do_rescale", True) else 1.0
  if rescale != 1 / 255:
    spec["rescale"] = rescale
  return spec, f"from {path}"


def _hint(error: ConvertError, state: dict, config: dict) -> ConvertError:
  """The error, plus "try --family=X" when the keys look like another family's, or the
  architecture config.json names when it is another BLIP head (captioning, VQA, BlipModel)."""
  guess = families.guess_family(state)
  message = str(error).rstrip(".")
  if guess and guess != FAMILY:
    return ConvertError(f"{message}. The keys look like a {guess!r} checkpoint: try --family={guess}.")
  names = config.get("architectures") or []
  if guess == FAMILY and isinstance(names, list) and names and RETRIEVAL not in names:
    return ConvertError(f"{message}. config.json names {', '.join(map(str, names))}; --family=blip converts "
                        f"{RETRIEVAL} checkpoints (e.g. Salesforce/blip-itm-base-coco).")
  return error


def convert(src: str, dst: str, tokenizer_dir: str | None = None, lower_case: str = "auto",
            seed: int = 0, model_config_path: str | None = None, log=print, *, load_tokenizer) -> dict:
  """Converts the BLIP retrieval checkpoint `src` into the directory `dst`; returns model.json.

  `load_tokenizer(family, config, dir, lower_case) -> (tokenizer, note)` is
  `rerank.models.convert.load_hf_tokenizer` (passed in: that module dispatches here).
  Raises ConvertError.
  """
  pretrained.check_destination(dst)
  t0 = time.perf_counter()
  src_dir = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  files = pretrained.find_weights(src)
  weights = files[0] if len(files) == 1 else f"{src_dir} ({len(files)} shards)"
  config, config_path = families.read_config(src_dir, FAMILY, model_config_path)
  state = {}
  for path in files:
    state.update(pretrained.read_state_dict(path))
  state = pretrained.normalise_keys(state)
  try:
    # The layout is checked before the tokenizer is loaded (as for the region families).
    if config.get("model_type", FAMILY) != FAMILY:
      raise ConvertError(f"{config_path}: model_type: expected {FAMILY!r} (a BlipConfig); "
                         f"found {config.get('model_type')!r}")
    cfg = model_config(config, config_path)
    state = _reshape_state(state, cfg)
    params, report = pretrained.build_params(cfg, state, entries(cfg), ignored=_IGNORED, source=weights,
                                             seed=seed, shapes=expected_shapes(cfg))
  except ConvertError as e:
    raise _hint(e, state, config) from e
  del state
  tokenizer, tok_note = load_tokenizer(FAMILY, config.get("text_config", {}), tokenizer_dir or src_dir, lower_case)
  if len(tokenizer) > cfg.vocab_size:
    raise ConvertError(f"tokenizer ({tok_note}) has {len(tokenizer)} tokens but the checkpoint's word embedding "
                       f"has {cfg.vocab_size} rows; pass the matching --tokenizer")
  image, image_note = image_settings(src_dir, cfg)
  meta = {"family": FAMILY, "source": [os.path.abspath(f) for f in files], "model": dataclasses.asdict(cfg),
          "image": image, "has_ce_head": True, "vocab_size": cfg.vocab_size,
          "cls_token": tokenizer.cls_token, "cls_token_id": tokenizer.cls_token_id,
          "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
          "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens},
          "tokenizer": tok_note, "report": {**report, "image": image_note,
                                            "notes": ["ITM reads the token ids as given (transformers' "
                                                      "BlipForImageTextRetrieval; no [ENC] swap)"]}}
  pretrained.write_converted(dst, meta, params, tokenizer)
  log(f"converted {FAMILY} checkpoint {weights} -> {dst} in {time.perf_counter() - t0:.1f}s")
  log(f"  vision: {cfg.vision_num_layers} layers x {cfg.vision_hidden_size}, {cfg.image_size}px / "
      f"{cfg.patch_size}px patches; text: {cfg.num_layers} layers x {cfg.hidden_size}, vocab "
      f"{cfg.vocab_size}; ITC width {cfg.embed_dim}; tokenizer: {tok_note}")
  log(f"  loaded {report['loaded']} tensors (ITC projections and ITM head included); "
      f"ignored: {report['ignored'] or 'none'}; image preprocessing {image_note}")
  return meta
