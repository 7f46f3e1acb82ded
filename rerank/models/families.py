"""Per-family checkpoint layouts: config -> EncoderConfig, and checkpoint key -> our parameter.

- bert: any HF BERT-architecture directory (BertModel, pretraining/classification dumps with
  a `bert.` prefix, sentence-embedding dirs), and RoBERTa / XLM-R (`roberta.` prefix;
  positions counted from padding_idx + 1). Regions get a fresh OSCAR-style projection.
- oscar: OSCAR's BertImgModel: BERT plus `img_embedding` (2054 -> H) and, when the config
  sets use_img_layernorm, a LayerNorm with img_layer_norm_eps.
- m3p: M3P's XLM-style TransformerModel (`m3p_under_weights.pth`): image-first, one position
  embedding and LayerNorm over the joint sequence, LN(Linear(f) + Linear(loc5)) regions.
- uniter: UNITER (`uniter.` prefix): LN(LN(Linear(f)) + LN(Linear(box7)) + type 1) regions.
Sizes, vocabulary, eps and activation come from the checkpoint's config (M3P ships none:
its sizes are read from the weight shapes).
"""

import contextlib
import dataclasses
import json
import math
import os
import re

from rerank.models import encoder as encoder_lib
from rerank.models.pretrained import ConvertError, Entry, read_json_object

FAMILIES = ("bert", "oscar", "m3p", "uniter")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}


@dataclasses.dataclass
class Spec:
  """What `load.build_params` needs for one checkpoint."""
  cfg: encoder_lib.EncoderConfig
  entries: list
  optional: tuple = ()  # checkpoint keys that may be absent (fresh init, reported)
  ignored: tuple = ()  # checkpoint key prefixes of unused heads (reported)
  fresh: tuple = ()  # our parameter paths that are new by design
  notes: list = dataclasses.field(default_factory=list)


def _linear(path, key, n_in=1):
  return [Entry(path + ("kernel",), key + ".weight", "weight", n_in),
          Entry(path + ("bias",), key + ".bias", "bias")]


def _norm(path, key):
  return [Entry(path + ("scale",), key + ".weight"), Entry(path + ("bias",), key + ".bias")]


def _embed(path, key):
  return [Entry(path + ("embedding",), key + ".weight")]


def _bert_backbone(cfg) -> list:
  """Text embeddings, layers and pooler in HF BERT naming (also OSCAR's and UNITER's)."""
  e = ("embeddings",)
  out = (_embed(e + ("word_embeddings",), "embeddings.word_embeddings")
         + _embed(e + ("position_embeddings",), "embeddings.position_embeddings")
         + _norm(e + ("LayerNorm",), "embeddings.LayerNorm"))
  if cfg.type_vocab_size:
    out += _embed(e + ("token_type_embeddings",), "embeddings.token_type_embeddings")
  for i in range(cfg.num_layers):
    k, p = f"encoder.layer.{i}.", (f"layer_{i}",)
    for name in ("query", "key", "value"):
      out += _linear(p + ("attention", name), k + f"attention.self.{name}")
    out += _linear(p + ("attention", "output"), k + "attention.output.dense", n_in=2)
    out += _norm(p + ("attention_norm",), k + "attention.output.LayerNorm")
    out += _linear(p + ("intermediate",), k + "intermediate.dense")
    out += _linear(p + ("mlp_output",), k + "output.dense")
    out += _norm(p + ("output_norm",), k + "output.LayerNorm")
  return out + _linear(("pooler",), "pooler.dense")


def _pooler_keys():
  return ("pooler.dense.weight", "pooler.dense.bias")


def strip_prefix(state: dict, prefixes) -> tuple[dict, str, tuple]:
  """Removes the model prefix (`bert.`, `roberta.`, `uniter.`) when the backbone carries one.

  Returns (state, the prefix or "", the keys that did not carry it: the checkpoint's heads).
  """
  for p in prefixes:
    if any(k.startswith(p + "embeddings.") for k in state):
      outside = tuple(k for k in state if not k.startswith(p))
      return {(k[len(p):] if k.startswith(p) else k): v for k, v in state.items()}, p, outside
  return state, "", ()


# Region-embedding modules of the families: never a head, always backbone.
_VISUAL_ROOTS = ("img_embedding.", "img_embeddings.", "image_embeddings.", "LayerNorm.")


def _heads(state: dict, roots, prefix: str, outside: tuple) -> tuple:
  """Keys of task/pretraining heads we do not use (reported, not converted).

  With a model prefix, the heads are the keys outside it: everything under `bert.` is backbone,
  so a backbone tensor the family does not map (OSCAR's region embedding read as BERT) is an
  error, not an ignored head. Without one, the keys outside the backbone's modules, bar any
  family's region embedding.
  """
  if prefix:
    return outside
  return tuple(k for k in state if not k.startswith(tuple(roots) + _VISUAL_ROOTS))


def _bert_fields(c: dict, source: str) -> dict:
  need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  missing = [k for k in need if k not in c]
  if missing:
    raise ConvertError(f"{source}: missing field(s) {', '.join(missing)} (a BERT-style config.json has them)")
  act = c.get("hidden_act", "gelu")
  if act not in _ACTIVATIONS:
    raise ConvertError(f"{source}: hidden_act: expected one of {sorted(_ACTIVATIONS)}; found {act!r}")
  return dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
              num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
              max_position_embeddings=c.get("max_position_embeddings", 512),
              type_vocab_size=c.get("type_vocab_size", 2), layer_norm_eps=c.get("layer_norm_eps", 1e-12),
              dropout_rate=c.get("hidden_dropout_prob", 0.1),
              attention_dropout_rate=c.get("attention_probs_dropout_prob", 0.1),
              hidden_act=_ACTIVATIONS[act])


def _make_cfg(source: str, **fields) -> encoder_lib.EncoderConfig:
  try:
    return encoder_lib.EncoderConfig(**fields)
  except ValueError as e:
    raise ConvertError(f"{source}: {e}") from e


def is_roberta(config: dict) -> bool:
  return config.get("model_type", "") in ("roberta", "xlm-roberta", "camembert")


def bert_spec(config: dict, state: dict, source: str):
  roberta = is_roberta(config)
  state, prefix, outside = strip_prefix(state, ("roberta.",) if roberta else ("bert.",))
  fields = _bert_fields(config, source)
  notes = []
  if roberta:
    # HF RoBERTa/XLM-R: position ids are padding_idx + 1 + index of the (non-pad) token.
    fields["position_offset"] = config.get("pad_token_id", 1) + 1
    notes.append(f"RoBERTa-style positions: offset {fields['position_offset']}")
  cfg = _make_cfg(source, **fields, visual="oscar", order="text_first")
  buffers = ("embeddings.position_ids", "embeddings.token_type_ids")
  notes.append("region embedding (img_embeddings) is new: a BERT checkpoint has none")
  return state, Spec(cfg, _bert_backbone(cfg), optional=_pooler_keys(),
                     ignored=buffers + _heads(state, ("embeddings.", "encoder.", "pooler."), prefix, outside),
                     fresh=(("img_embeddings",),), notes=notes), prefix


def oscar_spec(config: dict, state: dict, source: str):
  state, prefix, outside = strip_prefix(state, ("bert.",))
  fields = _bert_fields(config, source)
  if str(config.get("img_feature_type", "faster_r-cnn")).startswith("dis_code"):
    raise ConvertError(f"{source}: img_feature_type {config['img_feature_type']!r} (discrete codes) is "
                       "not supported; expected detector features (faster_r-cnn)")
  img_dim = int(config.get("img_feature_dim", 2054))  # MMT-Retrieval's default when absent
  use_ln = bool(config.get("use_img_layernorm", False))
  cfg = _make_cfg(source, **fields, visual="oscar", order="text_first", feature_dim=img_dim - 6, box_dim=6,
                  visual_layernorm=use_ln,
                  visual_layer_norm_eps=config.get("img_layer_norm_eps") if use_ln else None)
  entries = _bert_backbone(cfg) + _linear(("img_embeddings", "img_embedding"), "img_embedding")
  if use_ln:
    entries += _norm(("img_embeddings", "LayerNorm"), "LayerNorm")
  roots = ("embeddings.", "encoder.", "pooler.", "img_embedding.", "LayerNorm.")
  return state, Spec(cfg, entries, optional=_pooler_keys(),
                     ignored=("embeddings.position_ids",) + _heads(state, roots, prefix, outside)), prefix


def uniter_spec(config: dict, state: dict, source: str):
  state, prefix, outside = strip_prefix(state, ("uniter.", "bert."))
  fields = _bert_fields(config, source)
  fields["layer_norm_eps"] = 1e-12  # UNITER hard-codes its LayerNorm eps
  w = state.get("img_embeddings.img_linear.weight")
  img_dim = w.shape[1] if w is not None else 2048
  cfg = _make_cfg(source, **fields, visual="uniter", order="text_first", feature_dim=img_dim, box_dim=6)
  i = ("img_embeddings",)
  entries = (_bert_backbone(cfg) + _linear(i + ("img_linear",), "img_embeddings.img_linear")
             + _norm(i + ("img_layer_norm",), "img_embeddings.img_layer_norm")
             + _linear(i + ("pos_linear",), "img_embeddings.pos_linear")
             + _norm(i + ("pos_layer_norm",), "img_embeddings.pos_layer_norm")
             + _norm(i + ("LayerNorm",), "img_embeddings.LayerNorm"))
  roots = ("embeddings.", "img_embeddings.", "encoder.", "pooler.")
  ignored = (("img_embeddings.mask_embedding.", "embeddings.position_ids")
             + _heads(state, roots, prefix, outside))
  return state, Spec(cfg, entries, optional=_pooler_keys(), ignored=ignored), prefix


# M3P modules that its pretraining/generation uses and retrieval does not.
_M3P_UNUSED = ("encoder_attn.", "layer_norm15.", "refine_embeddings.", "cross_alignment.", "seq_relationship.",
               "mrfr_dense.", "transformer_obj.", "pred_layer.", "pred_obj_layer.", "cross_lang_embeddings.",
               "lang_embeddings.", "image_embeddings.image_distbution_embeddings.")


def m3p_spec(config: dict, state: dict, source: str):
  absent = [k for k in ("embeddings.weight", "attentions.0.q_lin.weight") if k not in state]
  if absent:
    raise ConvertError("--family=m3p: expected M3P (XLM-style) weights with embeddings.weight and "
                       f"attentions.0.q_lin.weight; found no {' or '.join(absent)}")
  vocab, hidden = state["embeddings.weight"].shape
  layer_ids = [re.match(r"attentions\.(\d+)\.q_lin\.weight$", k) for k in state]
  layers = 1 + max(int(m.group(1)) for m in layer_ids if m)
  heads = int(config.get("n_heads", config.get("num_attention_heads", hidden // 64)))
  notes = [] if ("n_heads" in config or "num_attention_heads" in config) else [
      f"no n_heads in config: assumed {heads} (head size 64, as M3P-base)"]
  mlp = state["ffns.0.lin1.weight"].shape[0] if "ffns.0.lin1.weight" in state else 4 * hidden
  max_pos = state["position_embeddings.weight"].shape[0] if "position_embeddings.weight" in state else 514
  act = "gelu" if config.get("gelu_activation", True) else "relu"
  cfg = _make_cfg(source, vocab_size=int(vocab), hidden_size=int(hidden), num_layers=layers, num_heads=heads,
                  mlp_dim=int(mlp), max_position_embeddings=int(max_pos), type_vocab_size=0,
                  layer_norm_eps=1e-12, hidden_act=act, dropout_rate=config.get("dropout", 0.1),
                  attention_dropout_rate=config.get("attention_dropout", 0.1), visual="m3p",
                  order="image_first", positions="sequence", feature_dim=2048, box_dim=6)
  e, i = ("embeddings",), ("img_embeddings",)
  entries = (_embed(e + ("word_embeddings",), "embeddings")
             + _embed(e + ("position_embeddings",), "position_embeddings")
             + _norm(e + ("LayerNorm",), "layer_norm_emb")
             + _linear(i + ("img_embedding",), "image_embeddings.image_embeddings")
             + _linear(i + ("loc_embedding",), "image_embeddings.image_location_embeddings")
             + _norm(i + ("LayerNorm",), "image_embeddings.LayerNorm"))
  for n in range(layers):
    p = (f"layer_{n}",)
    for ours, theirs in (("query", "q_lin"), ("key", "k_lin"), ("value", "v_lin")):
      entries += _linear(p + ("attention", ours), f"attentions.{n}.{theirs}")
    entries += _linear(p + ("attention", "output"), f"attentions.{n}.out_lin", n_in=2)
    entries += _norm(p + ("attention_norm",), f"layer_norm1.{n}")
    entries += _linear(p + ("intermediate",), f"ffns.{n}.lin1")
    entries += _linear(p + ("mlp_output",), f"ffns.{n}.lin2")
    entries += _norm(p + ("output_norm",), f"layer_norm2.{n}")
  entries += _linear(("pooler",), "pooled_layer.dense")
  return state, Spec(cfg, entries, optional=("pooled_layer.dense.weight", "pooled_layer.dense.bias"),
                     ignored=_M3P_UNUSED, notes=notes), ""


SPECS = {"bert": bert_spec, "oscar": oscar_spec, "m3p": m3p_spec, "uniter": uniter_spec}


def guess_family(state: dict) -> str | None:
  """The family whose signature keys `state` has, for a hint when --family looks wrong."""
  keys = set(state)
  has = lambda suffix: any(k.endswith(suffix) for k in keys)  # noqa: E731
  if has("embeddings.patch_embeddings.projection.weight") and has("embeddings.text_embeddings.word_embeddings.weight"):
    return "vilt"  # transformers' ViltModel (pixel family: rerank.models.vilt_convert)
  if "attentions.0.q_lin.weight" in keys or has(".attentions.0.q_lin.weight"):
    return "m3p"
  if has("img_embeddings.img_linear.weight"):
    return "uniter"
  if has("img_embedding.weight"):
    return "oscar"
  if has("vision_model.encoder.layers.0.self_attn.qkv.weight"):  # before bert: BLIP's text tower is BERT
    return "blip"
  if has("encoder.layer.0.attention.self.query.weight"):
    return "bert"
  return None


def read_config(src_dir: str, family: str, path: str | None = None) -> tuple[dict, str]:
  """(config dict, its path): `path`, else the directory's config.json; M3P may have none."""
  if path and not os.path.isfile(path):
    raise ConvertError(f"--model_config {path!r}: no such file")
  path = path or os.path.join(src_dir, "config.json")
  if not os.path.isfile(path):
    if family == "m3p":
      return {}, "(no config.json)"
    raise ConvertError(f"{src_dir}: no config.json (the {family} family reads its sizes from it; "
                       "or pass --model_config=FILE)")
  config = read_json_object(path)
  check_config_types(config, path)
  return config, path


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The config.json fields the families read: (test, what the test means).
_FIELD_TYPES = {
    **{name: (lambda v: _is_int(v) and v >= 1, "an integer >= 1") for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "img_feature_dim", "n_heads")},
    **{name: (lambda v: _is_int(v) and v >= 0, "an integer >= 0") for name in (
        "type_vocab_size", "pad_token_id")},
    **{name: (lambda v: _is_number(v) and v > 0, "a number > 0") for name in (
        "layer_norm_eps", "img_layer_norm_eps")},
    **{name: (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)") for name in (
        "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")},
    **{name: (lambda v: isinstance(v, str), "a string") for name in (
        "hidden_act", "model_type", "img_feature_type")},
    **{name: (lambda v: isinstance(v, bool) or v in (0, 1), "true/false or 0/1") for name in (
        "use_img_layernorm", "gelu_activation")},
}


def check_config_types(config: dict, path: str) -> None:
  """ConvertError naming the first field the families read whose value has the wrong type.

  `null` counts as absent for the optional eps field only (OSCAR writes it when unused).
  """
  for name, (ok, what) in _FIELD_TYPES.items():
    if name not in config or (name == "img_layer_norm_eps" and config[name] is None):
      continue
    if not ok(config[name]):
      raise ConvertError(f"{path}: {name}: expected {what}; found {json.dumps(config[name])[:80]}")


@contextlib.contextmanager
def family_hint(family: str, guess: str | None):
  """Adds "try --family=X" to a ConvertError when the keys look like another family's."""
  try:
    yield
  except ConvertError as e:
    if not guess or guess == family:
      raise
    raise ConvertError(f"{str(e).rstrip('.')}. The keys look like a {guess!r} checkpoint: "
                                  f"try --family={guess}.") from e
