"""Converting a pretrained PyTorch checkpoint (BERT/XLM-R, OSCAR, M3P, UNITER; ViLT, BLIP).

`convert(family, src, dst, ...)` reads the checkpoint's config, weights and tokenizer, maps the
weights through the family's key layout (`families`), checks every key and shape
(`pretrained.build_params`) and writes a converted checkpoint directory
(`pretrained.write_converted`: model.json, params/, tokenizer/). `python -m rerank.convert` is
its command line. Pixel families have their own converter module, `rerank/models/<family>_convert.py`
(`PIXEL_CONVERTERS`), which `convert` hands them to with the tokenizer loader.
"""

import dataclasses
import json
import os
import time

from rerank.models import blip_convert
from rerank.models import families
from rerank.models import pretrained
from rerank.models import vilt_convert

# Pixel families convert through their own module (their layout, heads and image settings).
PIXEL_CONVERTERS = {"vilt": vilt_convert.convert, "blip": blip_convert.convert}
ALL_FAMILIES = families.FAMILIES + tuple(PIXEL_CONVERTERS)


def _vocab_is_cased(vocab: dict) -> bool:
  """A cased WordPiece vocabulary holds capitalised words; an uncased one (almost) none."""
  words = [w for w in vocab if w.isalpha() and not w.startswith("[")]
  upper = sum(w[0].isupper() for w in words)
  return upper > max(10, 0.01 * len(words))


def load_hf_tokenizer(family: str, config: dict, tok_dir: str, lower_case: str = "auto"):
  """The checkpoint's tokenizer through transformers; returns (tokenizer, note)."""
  import transformers  # pylint: disable=import-outside-toplevel
  xlmr = family == "m3p" or families.is_roberta(config)
  try:
    if xlmr:
      tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
      return tok, f"{type(tok).__name__} from {tok_dir}"
    vocab_file = os.path.join(tok_dir, "vocab.txt")
    json_file = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.isfile(vocab_file) and not os.path.isfile(json_file):
      raise pretrained.ConvertError(
          f"{tok_dir}: no vocab.txt or tokenizer.json for the {family} WordPiece tokenizer; "
          "pass --tokenizer=DIR with the checkpoint's vocabulary")
    tok_json = json.load(open(json_file)) if os.path.isfile(json_file) else {}
    tok_cfg_path = os.path.join(tok_dir, "tokenizer_config.json")
    tok_cfg = json.load(open(tok_cfg_path)) if os.path.isfile(tok_cfg_path) else {}
    normalizer = tok_json.get("normalizer") or {}
    # transformers lower-cases by default when tokenizer_config.json is absent, even for a cased
    # tokenizer.json, so the flag is always decided here and passed explicitly.
    if lower_case != "auto":
      lower, why = lower_case == "true", "--lower_case"
    elif "do_lower_case" in tok_cfg:
      lower, why = bool(tok_cfg["do_lower_case"]), "tokenizer_config.json"
    elif "lowercase" in normalizer:
      lower, why = bool(normalizer["lowercase"]), "tokenizer.json normalizer"
    else:
      vocab = (_read_vocab(vocab_file) if os.path.isfile(vocab_file)
               else tok_json["model"]["vocab"])
      lower, why = not _vocab_is_cased(vocab), "inferred from the vocabulary"
    tok = transformers.BertTokenizer.from_pretrained(tok_dir, do_lower_case=lower)
    if getattr(tok.backend_tokenizer.normalizer, "lowercase", lower) != lower:
      raise pretrained.ConvertError(
          f"{tok_dir}: transformers did not apply do_lower_case={lower} ({why})")
    return tok, f"BERT WordPiece from {tok_dir}, do_lower_case={lower} ({why})"
  except (OSError, ValueError, TypeError) as e:
    if isinstance(e, pretrained.ConvertError):
      raise
    detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    raise pretrained.ConvertError(
        f"{tok_dir}: cannot load the {family} tokenizer with transformers ({detail[:300]})") from e


def _read_vocab(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return {line.rstrip("\n"): i for i, line in enumerate(f)}


def convert(family: str, src: str, dst: str, tokenizer_dir: str | None = None,
            lower_case: str = "auto", seed: int = 0, model_config: str | None = None,
            log=print) -> dict:
  """Converts `src` into the directory `dst`; returns model.json's content. Raises ConvertError."""
  if family in PIXEL_CONVERTERS:
    return PIXEL_CONVERTERS[family](src, dst, tokenizer_dir, lower_case, seed, model_config, log,
                                    load_tokenizer=load_hf_tokenizer)
  if family not in families.FAMILIES:
    raise pretrained.ConvertError(
        f"--family: expected one of {', '.join(ALL_FAMILIES)}; found {family!r}")
  pretrained.check_destination(dst)
  t0 = time.perf_counter()
  src_dir = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  files = pretrained.find_weights(src)
  weights = files[0] if len(files) == 1 else f"{src_dir} ({len(files)} shards)"
  state = {}
  for path in files:
    state.update(pretrained.read_state_dict(path))
  state = pretrained.normalise_keys(state)
  guess = families.guess_family(state)
  # The layout is checked before the tokenizer is loaded: a checkpoint of another family then
  # fails with the family hint, not with whatever that family's tokenizer loader says.
  # The config too: another family's config.json may not pass this family's checks.
  with families.family_hint(family, guess):
    config, config_path = families.read_config(src_dir, family, model_config)
    state, spec, prefix = families.SPECS[family](config, state, config_path)
  tokenizer, tok_note = load_hf_tokenizer(family, config, tokenizer_dir or src_dir, lower_case)
  with families.family_hint(family, guess):
    params, report = pretrained.build_params(
        spec.cfg, state, spec.entries, optional=spec.optional, ignored=spec.ignored,
        fresh=spec.fresh, source=weights, seed=seed)
  del state
  cfg = spec.cfg
  if len(tokenizer) > cfg.vocab_size:
    raise pretrained.ConvertError(
        f"tokenizer ({tok_note}) has {len(tokenizer)} tokens but the checkpoint's word embedding "
        f"has {cfg.vocab_size} rows; pass the matching --tokenizer")
  meta = {"family": family, "source": [os.path.abspath(f) for f in files], "key_prefix": prefix,
          "encoder": dataclasses.asdict(cfg), "vocab_size": cfg.vocab_size,
          "cls_token": tokenizer.cls_token, "cls_token_id": tokenizer.cls_token_id,
          "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
          "tokenizer": tok_note, "report": {**report, "notes": spec.notes,
                                            "new_when_training": ["ce_head (2-way CE head)"]}}
  pretrained.write_converted(dst, meta, params, tokenizer)
  log(f"converted {family} checkpoint {weights} -> {dst} in {time.perf_counter() - t0:.1f}s")
  log(f"  encoder: {cfg.num_layers} layers x {cfg.hidden_size}, {cfg.num_heads} heads, "
      f"vocab {cfg.vocab_size}, visual={cfg.visual}, order={cfg.order}; tokenizer: {tok_note}")
  log(f"  loaded {report['loaded']} tensors; ignored heads: {report['ignored'] or 'none'}")
  if report["fresh"]:
    log(f"  freshly initialised (not in the checkpoint): {', '.join(report['fresh'])}")
  for note in spec.notes:
    log(f"  note: {note}")
  log("  new when training starts: ce_head (the 2-way cross-encoder head)")
  return meta
