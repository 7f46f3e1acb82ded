"""Converting transformers' ViLT checkpoints (ViltModel, ViltForImageAndTextRetrieval) for `vilt.Model`.

`convert(src, dst, ...)` (what `python -m rerank.convert --family=vilt` runs) reads config.json,
the weights (safetensors, or a torch file through `pretrained.read_state_dict`'s safe loader),
the BERT WordPiece tokenizer and preprocessor_config.json of a HF directory, checks every key
and shape against the model the config describes (one ConvertError naming everything missing,
unexpected or mis-shaped) and writes a converted directory with `pretrained.write_converted`.

The retrieval fine-tunes' head is `rank_output`, Linear(hidden -> 1) on the pooled output. Our
CE head is 2-way (column 1 = match): it becomes column 1, with column 0 zero, so column 1 is
the checkpoint's own score and a softmax over the two columns is sigmoid(score). A checkpoint
without it (ViltModel, the MLM pretraining) gets a fresh head, reported; other task heads
(MLM, VQA, NLVR2) are ignored and reported.
"""

import dataclasses
import json
import os
import time

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rerank.models import families
from rerank.models import pretrained
from rerank.models import vilt

PREFIX = "vilt."  # the backbone's prefix inside a model with a head
HEAD = ("rank_output.weight", "rank_output.bias")
# HF ViltImageProcessor's defaults (when preprocessor_config.json is absent or silent).
_LONGER_RATIO = 1333 / 800
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: our path in the model tree, its checkpoint key, how the value maps.

  kind: "copy" (same shape), "weight" (torch Linear [out, in] -> kernel [in..., out...] with
  `n_in` input axes), "bias" (flat -> our shape), "conv" (torch [out, in, kh, kw] -> flax
  [kh, kw, in, out]), "squeeze" (torch's leading 1-sized axes dropped: [1, 1, H] -> [H]).
  """
  path: tuple
  key: str
  kind: str = "copy"
  n_in: int = 1


def _source_shape(e: Entry, shape: tuple) -> tuple:
  """The shape the checkpoint must hold for our parameter of `shape`."""
  if e.kind == "weight":
    return (int(np.prod(shape[e.n_in:])), int(np.prod(shape[:e.n_in])))
  if e.kind == "bias":
    return (int(np.prod(shape)),)
  if e.kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if e.kind == "squeeze":
    return (1,) * (3 - len(shape)) + tuple(shape)
  return tuple(shape)


def _to_ours(e: Entry, value: np.ndarray, shape: tuple) -> np.ndarray:
  if e.kind == "weight":
    return np.ascontiguousarray(value.T).reshape(shape)
  if e.kind == "conv":
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  return value.reshape(shape)


def _linear(path, key, n_in=1):
  return [Entry(path + ("kernel",), key + ".weight", "weight", n_in),
          Entry(path + ("bias",), key + ".bias", "bias")]


def _norm(path, key):
  return [Entry(path + ("scale",), key + ".weight"), Entry(path + ("bias",), key + ".bias")]


def entries(cfg: vilt.Config) -> list:
  """Every backbone parameter of `vilt.Model` and its ViltModel key (no prefix)."""
  t, p = ("text_embeddings",), ("patch_embeddings",)
  out = [Entry(t + ("word_embeddings", "embedding"), "embeddings.text_embeddings.word_embeddings.weight"),
         Entry(t + ("position_embeddings", "embedding"),
               "embeddings.text_embeddings.position_embeddings.weight"),
         Entry(t + ("token_type_embeddings", "embedding"),
               "embeddings.text_embeddings.token_type_embeddings.weight"),
         *_norm(t + ("LayerNorm",), "embeddings.text_embeddings.LayerNorm"),
         Entry(p + ("projection", "kernel"), "embeddings.patch_embeddings.projection.weight", "conv"),
         Entry(p + ("projection", "bias"), "embeddings.patch_embeddings.projection.bias"),
         Entry(p + ("cls_token",), "embeddings.cls_token", "squeeze"),
         Entry(p + ("position_embeddings",), "embeddings.position_embeddings", "squeeze"),
         Entry(("modality_embeddings", "embedding"), "embeddings.token_type_embeddings.weight")]
  for i in range(cfg.num_layers):
    k, l = f"encoder.layer.{i}.", (f"layer_{i}",)
    for name in ("query", "key", "value"):
      out += _linear(l + ("attention", name), k + f"attention.attention.{name}")
    out += _linear(l + ("attention", "output"), k + "attention.output.dense", n_in=2)
    out += _norm(l + ("attention_norm",), k + "layernorm_before")
    out += _norm(l + ("mlp_norm",), k + "layernorm_after")
    out += _linear(l + ("intermediate",), k + "intermediate.dense")
    out += _linear(l + ("mlp_output",), k + "output.dense")
  return out + _norm(("final_norm",), "layernorm") + _linear(("pooler",), "pooler.dense")


def expected_shapes(cfg: vilt.Config) -> dict:
  """{our path: shape} of every `vilt.Model` parameter, computed abstractly (no memory)."""
  images, mask = vilt.example_images(cfg, 1)
  args = (jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), images, mask)
  tree = jax.eval_shape(lambda k: vilt.Model(cfg).init(k, *args), jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree["params"]))[0]
  return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


# ------------------------------------------------------------------ config and preprocessing


def _square(c: dict, name: str, default: int, source: str) -> int:
  """image_size / patch_size: an int, or a square [n, n] as HF also allows."""
  v = c.get(name, default)
  if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
    v = v[0]
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise pretrained.ConvertError(f"{source}: {name}: expected a positive integer (or a square "
                                  f"[n, n]); found {json.dumps(v)[:80]}")
  return v


def read_config(src_dir: str, path: str | None = None) -> tuple:
  """(config dict, its path): `path`, else `src_dir`/config.json, its field types checked.

  transformers writes `"pad_token_id": null` for ViLT; as no ViLT field depends on it, null
  counts as absent.
  """
  if path and not os.path.isfile(path):
    raise pretrained.ConvertError(f"--model_config {path!r}: no such file")
  path = path or os.path.join(src_dir, "config.json")
  if not os.path.isfile(path):
    raise pretrained.ConvertError(f"{src_dir}: no config.json (ViLT reads its sizes from it; or pass "
                                  "--model_config=FILE)")
  config = pretrained.read_json_object(path)
  config = {k: v for k, v in config.items() if not (k == "pad_token_id" and v is None)}
  families.check_config_types(config, path)
  return config, path


def model_config(c: dict, canvas: tuple, source: str) -> tuple:
  """(vilt.Config, notes) of a HF ViltConfig dict; `canvas` (H, W) from the preprocessing."""
  notes = []
  fields = families._bert_fields(c, source)  # pylint: disable=protected-access  (same BERT fields)
  for name, want in (("num_channels", 3), ("qkv_bias", True)):
    if c.get(name, want) != want:
      raise pretrained.ConvertError(f"{source}: {name}: expected {json.dumps(want)} (what the model "
                                    f"implements); found {json.dumps(c[name])[:80]}")
  fields.update(max_position_embeddings=c.get("max_position_embeddings", 40),
                modality_type_vocab_size=c.get("modality_type_vocab_size", 2),
                image_size=_square(c, "image_size", 384, source),
                patch_size=_square(c, "patch_size", 32, source),
                max_image_height=canvas[0], max_image_width=canvas[1],
                dropout_rate=c.get("hidden_dropout_prob", 0.0),
                attention_dropout_rate=c.get("attention_probs_dropout_prob", 0.0))
  if isinstance(c.get("max_image_length"), int) and c["max_image_length"] > 0:
    notes.append(f"config max_image_length={c['max_image_length']}: transformers samples that many "
                 "patches at random; this model keeps every patch of the image")
  try:
    return vilt.Config(**fields), notes
  except ValueError as e:
    raise pretrained.ConvertError(f"{source}: {e}") from e


def image_settings(src_dir: str) -> tuple:
  """(image dict as `rerank.data.images.ImageSpec.from_dict` reads it, note) from preprocessor_config.json.

  The mapping follows ImageSpec.from_hf (models cannot import the data layer): shorter side
  `size`, longer side capped at int(1333 / 800 * size), both rounded down to `size_divisor`.
  """
  path = os.path.join(src_dir, "preprocessor_config.json")
  if not os.path.isfile(path):
    c, note = {}, f"no preprocessor_config.json in {src_dir}: ViLT's defaults"
  else:
    c = pretrained.read_json_object(path)
    note = f"image preprocessing from {path}"
  where = path if c else src_dir
  if not c.get("do_resize", True):
    raise pretrained.ConvertError(f"{where}: do_resize: expected true (the model needs bounded images); "
                                  "found false")
  size = c.get("size", 384)
  if isinstance(size, dict):
    size = size.get("shortest_edge")
  divisor = c.get("size_divisor", 32)
  for name, v in (("size", size), ("size_divisor", divisor)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise pretrained.ConvertError(f"{where}: {name}: expected a positive integer (size: or "
                                    f"{{\"shortest_edge\": n}}); found {json.dumps(v)[:80]}")
  normalise = c.get("do_normalize", True)
  mean = _triple(c.get("image_mean", 0.5) if normalise else 0.0, "image_mean", where)
  std = _triple(c.get("image_std", 0.5) if normalise else 1.0, "image_std", where)
  resample = c.get("resample", 3)
  resample = _RESAMPLE.get(resample, resample) if isinstance(resample, int) else resample
  if resample not in _RESAMPLE.values():
    raise pretrained.ConvertError(f"{where}: resample: expected a Pillow filter code 0-5; found "
                                  f"{json.dumps(resample)[:80]}")
  rescale = c.get("rescale_factor", 1 / 255) if c.get("do_rescale", True) else 1.0
  spec = {"kind": "vilt", "size": size, "max_size": int(_LONGER_RATIO * size), "size_divisor": divisor,
          "mean": mean, "std": std, "resample": resample, "rescale": rescale}
  return spec, note


def _triple(v, name: str, where: str) -> list:
  """Per-channel mean/std: 3 numbers (a single number applies to all three)."""
  is_number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
  v = [v] * 3 if is_number(v) else v
  if not (isinstance(v, list) and len(v) == 3 and all(is_number(x) for x in v)):
    raise pretrained.ConvertError(f"{where}: {name}: expected 3 numbers; found {json.dumps(v)[:80]}")
  return [float(x) for x in v]


def canvas(image: dict) -> tuple:
  """(H, W) every image fits in: the longest side the resize rule allows (ImageSpec.canvas)."""
  d = image["size_divisor"]
  side = max(image["max_size"] // d * d, d)
  return side, side


# ------------------------------------------------------------------ weights


def split_state(state: dict) -> tuple:
  """(backbone state without its prefix, head state, prefix, keys of other heads)."""
  prefixed = any(k.startswith(PREFIX + "embeddings.") for k in state)
  if not prefixed:
    return state, {}, "", []
  backbone = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
  head = {k: v for k, v in state.items() if k in HEAD}
  others = sorted(k for k in state if not k.startswith(PREFIX) and k not in HEAD)
  return backbone, head, PREFIX, others


def build_params(cfg: vilt.Config, state: dict, head: dict, source: str, seed: int = 0,
                 prefix: str = ""):
  """Checks `state` (backbone keys) and `head` against `cfg`; returns (param tree, report).

  `prefix`: the backbone's key prefix in the file, put back in messages so keys can be found.

  Raises ConvertError listing every missing, unexpected, mis-shaped and non-finite key.
  """
  shapes = expected_shapes(cfg)
  todo = entries(cfg)
  optional = ("pooler.dense.weight", "pooler.dense.bias")
  ignored = ("embeddings.text_embeddings.position_ids", "embeddings.text_embeddings.token_type_ids")
  missing, mismatched, nonfinite = [], [], []
  name = lambda key: key if key in HEAD else prefix + key  # noqa: E731

  def check(key, value, want):
    if tuple(value.shape) != tuple(want):
      mismatched.append(f"{name(key)}: checkpoint {tuple(value.shape)}, config implies {tuple(want)}")
    elif np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      nonfinite.append(f"{name(key)} ({int(np.size(value) - np.isfinite(value).sum())} of {np.size(value)} values)")

  for e in todo:
    if e.key in state:
      check(e.key, state[e.key], _source_shape(e, shapes[e.path]))
    elif e.key not in optional:
      missing.append(name(e.key))
  if head:
    for key, want in zip(HEAD, ((1, cfg.hidden_size), (1,))):
      if key in head:
        check(key, head[key], want)
      else:
        missing.append(key)
  used = {e.key for e in todo}
  unexpected = sorted(name(k) for k in state if k not in used and k not in ignored)
  problems = pretrained.key_problems(missing, unexpected, mismatched)
  if problems:
    raise pretrained.ConvertError(
        f"{source}: does not match the {cfg.num_layers}-layer, {cfg.hidden_size}-wide ViLT model its "
        f"config describes. " + " | ".join(problems))
  if nonfinite:
    raise pretrained.ConvertError(f"{source}: expected finite weights; found NaN or inf in "
                                  f"{len(nonfinite)} tensor(s): {'; '.join(nonfinite[:20])}")
  rng = np.random.default_rng(seed)
  flat, fresh = {}, []
  by_path = {e.path: e for e in todo}
  for path, shape in shapes.items():
    e = by_path.get(path)
    if e is not None and e.key in state:
      flat[path] = _to_ours(e, state.pop(e.key), shape)
  if head:
    # Column 1 is the checkpoint's score; column 0 stays 0 (module docstring).
    kernel = np.zeros((cfg.hidden_size, 2), np.float32)
    kernel[:, 1] = head["rank_output.weight"][0]
    flat[("ce_head", "kernel")] = kernel
    flat[("ce_head", "bias")] = np.array([0.0, head["rank_output.bias"][0]], np.float32)
  for path, shape in sorted(shapes.items()):
    if path not in flat:
      flat[path] = pretrained._fresh(path, shape, rng)  # pylint: disable=protected-access
      fresh.append("/".join(path))
  tree = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jax.device_put(np.asarray(value, np.float32))
  return tree, {"loaded": len(flat) - len(fresh), "fresh": fresh}


# ------------------------------------------------------------------ the conversion


def convert(src: str, dst: str, tokenizer_dir: str | None = None, lower_case: str = "auto",
            seed: int = 0, config_path: str | None = None, log=print, *, load_tokenizer) -> dict:
  """Converts the HF ViLT checkpoint `src` into the directory `dst`; returns model.json's content.

  `load_tokenizer(family, config, dir, lower_case) -> (tokenizer, note)` is
  `rerank.models.convert.load_hf_tokenizer` (passed in: that module dispatches here).
  """
  pretrained.check_destination(dst)
  t0 = time.perf_counter()
  src_dir = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  files = pretrained.find_weights(src)
  weights = files[0] if len(files) == 1 else f"{src_dir} ({len(files)} shards)"
  config, config_source = read_config(src_dir, config_path)
  image, image_note = image_settings(src_dir)
  state = {}
  for path in files:
    state.update(pretrained.read_state_dict(path))
  state = pretrained.normalise_keys(state)
  guess = families.guess_family(state)
  # Layout before tokenizer: another family's checkpoint fails with the family hint.
  with families.family_hint("vilt", guess):
    cfg, notes = model_config(config, canvas(image), config_source)
    backbone, head, prefix, others = split_state(state)
    del state
    params, report = build_params(cfg, backbone, head, weights, seed, prefix)
  tokenizer, tok_note = load_tokenizer("vilt", config, tokenizer_dir or src_dir, lower_case)
  if len(tokenizer) > cfg.vocab_size:
    raise pretrained.ConvertError(
        f"tokenizer ({tok_note}) has {len(tokenizer)} tokens but the checkpoint's word embedding "
        f"has {cfg.vocab_size} rows; pass the matching --tokenizer")
  has_head = bool(head)
  notes.append(image_note)
  meta = {"family": "vilt", "source": [os.path.abspath(f) for f in files], "key_prefix": prefix,
          "model": dataclasses.asdict(cfg), "image": image, "has_ce_head": has_head,
          "vocab_size": cfg.vocab_size, "cls_token": tokenizer.cls_token,
          "cls_token_id": tokenizer.cls_token_id, "pad_token": tokenizer.pad_token,
          "pad_token_id": tokenizer.pad_token_id, "tokenizer": tok_note,
          "report": {**report, "ignored": pretrained._group(others), "notes": notes}}
  pretrained.write_converted(dst, meta, params, tokenizer)
  log(f"converted vilt checkpoint {weights} -> {dst} in {time.perf_counter() - t0:.1f}s")
  log(f"  model: {cfg.num_layers} layers x {cfg.hidden_size}, {cfg.num_heads} heads, vocab "
      f"{cfg.vocab_size}, patches {cfg.patch_size}px, canvas {cfg.max_image_height}x{cfg.max_image_width}; "
      f"tokenizer: {tok_note}")
  log(f"  loaded {report['loaded']} tensors; ignored heads: {pretrained._group(others) or 'none'}")
  log("  CE head: " + ("the checkpoint's rank_output (column 1)" if has_head else
                       "none in the checkpoint: freshly initialised, train it before using the CE"))
  if report["fresh"]:
    log(f"  freshly initialised (not in the checkpoint): {', '.join(report['fresh'])}")
  for note in notes:
    log(f"  note: {note}")
  return meta
