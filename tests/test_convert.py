"""Checkpoint conversion: parity with transformers' torch BERT / XLM-R, family layouts, errors.

The torch tests build tiny random HF models here and save them with `save_pretrained`
(safetensors) and as a torch `.bin`; they skip without torch unless RERANK_REQUIRE_OPTIONAL
is set (CI), where they fail instead. OSCAR / M3P / UNITER use hand-made state dicts in each
family's key layout and a numpy forward pass written from the authors' code; one of them is
converted by `python -m rerank.convert` with torch unimportable (safetensors needs no torch).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy
from scipy import special

from rerank.data import datasets
from rerank.models import convert as convert_lib
from rerank.models import encoder as encoder_lib
from rerank.models import pretrained
from optional import require  # tests/, on the path as pytest runs these files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "a", "dog", "cat", "red", "blue", "sits", "on", "mat", "##s", "big", "small", "runs",
         "The", "Dog", "Red", "park", "in", "and", "with"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(15)]  # 40
H, LAYERS, HEADS, MLP = 32, 2, 4, 64



def _encode(tree, cfg, ids, tmask, regions=None, rmask=None):
  hidden, mask, pooled = encoder_lib.Encoder(cfg).apply({"params": tree}, ids, tmask, regions, rmask)
  return np.asarray(hidden), np.asarray(mask), np.asarray(pooled)


def _masked_mean(h, m):
  return (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)


def _text_batch(pad_id: int, rng, vocab: int, lengths=(7, 4, 2)):
  t = max(lengths)
  ids = np.full((len(lengths), t), pad_id, np.int64)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(5, vocab, n)
  return ids, ids != pad_id


# ------------------------------------------------------------------ HF BERT and XLM-R (torch)


def _save_hf(model, tokenizer, root, name):
  """Saves `model` as safetensors (save_pretrained) under root/name and as .bin under root/name_bin."""
  torch = require("torch")
  st_dir, bin_dir = os.path.join(root, name), os.path.join(root, name + "_bin")
  model.save_pretrained(st_dir)
  tokenizer.save_pretrained(st_dir)
  shutil.copytree(st_dir, bin_dir)
  for f in os.listdir(bin_dir):
    if f.endswith(".safetensors"):
      os.remove(os.path.join(bin_dir, f))
  torch.save(model.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
  return st_dir, bin_dir


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  torch = require("torch")
  transformers = require("transformers")
  torch.manual_seed(0)
  root = str(tmp_path_factory.mktemp("hf"))
  vocab_file = os.path.join(root, "vocab.txt")
  with open(vocab_file, "w") as f:
    f.write("\n".join(BERT_VOCAB) + "\n")
  bert_tok = transformers.BertTokenizer(vocab_file, do_lower_case=True)
  sizes = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=len(BERT_VOCAB), max_position_embeddings=24, **sizes)).eval()
  pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
      ("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS[:12])] + [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz"]
  xlmr_tok = transformers.XLMRobertaTokenizer(vocab=pieces + [("<mask>", 0.0)])
  xlmr = transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
      vocab_size=len(xlmr_tok), max_position_embeddings=26, type_vocab_size=1, pad_token_id=1,
      **sizes)).eval()
  # A pretraining dump: `bert.` prefix plus MLM/NSP heads.
  pretrain = transformers.BertForPreTraining(bert.config)
  pretrain.bert.load_state_dict(bert.state_dict())
  out = {"bert": (bert, *_save_hf(bert, bert_tok, root, "bert")),
         "xlmr": (xlmr, *_save_hf(xlmr, xlmr_tok, root, "xlmr")),
         "pretrain": (bert, *_save_hf(pretrain, bert_tok, root, "pretrain"))}
  out["tokenizers"] = {"bert": bert_tok, "xlmr": xlmr_tok}
  return out


@pytest.mark.parametrize("name", ["bert", "xlmr", "pretrain"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_parity_last_hidden_and_mean_pool(hf_models, tmp_path, name, fmt):
  torch = require("torch")
  model, st_dir, bin_dir = hf_models[name]
  dst = str(tmp_path / "conv")
  meta = convert_lib.convert("bert", st_dir if fmt == "safetensors" else bin_dir, dst, log=lambda *_: None)
  cfg = pretrained.encoder_config(meta)
  tree = pretrained.load_encoder_params(dst)
  pad = model.config.pad_token_id
  ids, mask = _text_batch(pad, np.random.default_rng(1), model.config.vocab_size)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
  want_h, want_pool = out.last_hidden_state.numpy(), out.pooler_output.numpy()
  hidden, _, pooled = _encode(tree, cfg, ids.astype(np.int32), mask)
  np.testing.assert_allclose(hidden[mask], want_h[mask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(_masked_mean(hidden, mask), _masked_mean(want_h, mask), atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, want_pool, atol=1e-4, rtol=0)
  assert meta["report"]["fresh"] and all(p.startswith("img_embeddings/") for p in meta["report"]["fresh"])
  if name == "pretrain":
    assert meta["key_prefix"] == "bert." and "cls.predictions" in meta["report"]["ignored"]
  if name == "xlmr":
    assert cfg.position_offset == 2 and meta["cls_token"] == "<s>" and meta["pad_token_id"] == 1


@pytest.mark.parametrize("name", ["bert", "xlmr"])
def test_converted_tokenizer_matches_transformers(hf_models, tmp_path, name):
  _, st_dir, _ = hf_models[name]
  convert_lib.convert("bert", st_dir, str(tmp_path / "c"), log=lambda *_: None)
  ours = datasets.load_tokenizer(str(tmp_path / "c"))
  theirs = hf_models["tokenizers"][name]
  for text in ["The Dog sits on the mat", "a red cats runs in the park", "big and small"]:
    assert ours.encode(text).ids == theirs(text)["input_ids"], text


def test_wordpiece_case_follows_the_checkpoint(tmp_path):
  transformers = require("transformers")
  del transformers
  for lower_cfg, want_first in ((None, "The"), (True, "the")):
    d = tmp_path / f"tok{lower_cfg}"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(BERT_VOCAB[:5] + WORDS + [f"X{chr(97 + i)}y" for i in range(26)]) + "\n")
    if lower_cfg is not None:
      (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower_cfg}))
    tok, note = convert_lib.load_hf_tokenizer("uniter", {}, str(d))
    assert tok.convert_ids_to_tokens(tok("The Dog")["input_ids"])[1] == want_first, note


# ------------------------------------------------------------------ errors


def test_wrong_family_truncated_file_and_shape_mismatch_fail_cleanly(hf_models, tmp_path):
  _, st_dir, bin_dir = hf_models["bert"]
  dst = str(tmp_path / "out")
  with pytest.raises(pretrained.ConvertError, match=r"missing.*img_embedding\.weight.*--family=bert"):
    convert_lib.convert("oscar", st_dir, dst, log=lambda *_: None)
  for src, fname in ((st_dir, "model.safetensors"), (bin_dir, "pytorch_model.bin")):
    bad = tmp_path / f"trunc_{fname}"
    shutil.copytree(src, bad)
    data = (bad / fname).read_bytes()
    (bad / fname).write_bytes(data[: len(data) // 2])
    with pytest.raises(pretrained.ConvertError, match="truncated"):
      convert_lib.convert("bert", str(bad), dst, log=lambda *_: None)
  bad = tmp_path / "shape"
  shutil.copytree(st_dir, bad)
  config = json.loads((bad / "config.json").read_text())
  config["intermediate_size"] = 80
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(pretrained.ConvertError, match=r"mis-shaped.*intermediate\.dense\.weight: checkpoint \(64, 32\), "
                     r"config implies \(80, 32\)"):
    convert_lib.convert("bert", str(bad), dst, log=lambda *_: None)
  assert not os.path.exists(dst) and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_bin_with_code_objects_is_refused(tmp_path):
  torch = require("torch")
  path = str(tmp_path / "evil.bin")
  torch.save({"w": torch.zeros(2), "obj": _Unsafe()}, path)
  with pytest.raises(pretrained.ConvertError, match="weights_only"):
    pretrained.read_state_dict(path)


class _Unsafe:
  pass


def test_cli_exit_code_and_message(hf_models, tmp_path):
  _, st_dir, _ = hf_models["bert"]
  dst = str(tmp_path / "cli")
  proc = subprocess.run([sys.executable, "-m", "rerank.convert", "--family=uniter", f"--src={st_dir}",
                         f"--dst={dst}"], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=480)
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "img_embeddings.img_linear.weight" in lines[0] and "--family=bert" in lines[0]
  assert not os.path.exists(dst)


# ------------------------------------------------------------------ OSCAR / M3P / UNITER layouts


def _ln(x, w, b, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _lin(x, sd, key):
  return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def _np_layers(x, mask, sd, names):
  """Post-LN Transformer layers in float64, reading the checkpoint's own keys."""
  b, s, _ = x.shape
  d = H // HEADS
  for i in range(LAYERS):
    n = {k: v.format(i=i) for k, v in names.items()}
    q, k, v = (_lin(x, sd, n[t]).reshape(b, s, HEADS, d) for t in ("q", "k", "v"))
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(d)
    scores = np.where(mask[:, None, None, :], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, H)
    x = _ln(x + _lin(ctx, sd, n["o"]), sd[n["ln1"] + ".weight"], sd[n["ln1"] + ".bias"])
    y = _lin(x, sd, n["i"])
    y = 0.5 * y * (1 + special.erf(y / np.sqrt(2)))
    x = _ln(x + _lin(y, sd, n["o2"]), sd[n["ln2"] + ".weight"], sd[n["ln2"] + ".bias"])
  return x


BERT_NAMES = dict(q="encoder.layer.{i}.attention.self.query", k="encoder.layer.{i}.attention.self.key",
                  v="encoder.layer.{i}.attention.self.value", o="encoder.layer.{i}.attention.output.dense",
                  ln1="encoder.layer.{i}.attention.output.LayerNorm", i="encoder.layer.{i}.intermediate.dense",
                  o2="encoder.layer.{i}.output.dense", ln2="encoder.layer.{i}.output.LayerNorm")
M3P_NAMES = dict(q="attentions.{i}.q_lin", k="attentions.{i}.k_lin", v="attentions.{i}.v_lin",
                 o="attentions.{i}.out_lin", ln1="layer_norm1.{i}", i="ffns.{i}.lin1", o2="ffns.{i}.lin2",
                 ln2="layer_norm2.{i}")


def _random_state(shapes: dict, rng) -> dict:
  out = {}
  for k, shape in shapes.items():
    base = 1.0 if k.endswith(".weight") and "norm" in k.lower() else 0.0  # LayerNorm scales near 1
    out[k] = (base + rng.normal(0, 0.3, shape)).astype(np.float32)
  return out


def _bert_shapes(prefix: str, vocab: int) -> dict:
  s = {f"{prefix}embeddings.word_embeddings.weight": (vocab, H), f"{prefix}embeddings.position_embeddings.weight": (24, H),
       f"{prefix}embeddings.token_type_embeddings.weight": (2, H), f"{prefix}embeddings.LayerNorm.weight": (H,),
       f"{prefix}embeddings.LayerNorm.bias": (H,), f"{prefix}pooler.dense.weight": (H, H),
       f"{prefix}pooler.dense.bias": (H,)}
  for i in range(LAYERS):
    for key, (o, n) in {"q": (H, H), "k": (H, H), "v": (H, H), "o": (H, H), "i": (MLP, H), "o2": (H, MLP)}.items():
      s[prefix + BERT_NAMES[key].format(i=i) + ".weight"] = (o, n)
      s[prefix + BERT_NAMES[key].format(i=i) + ".bias"] = (o,)
    for key in ("ln1", "ln2"):
      s[prefix + BERT_NAMES[key].format(i=i) + ".weight"] = (H,)
      s[prefix + BERT_NAMES[key].format(i=i) + ".bias"] = (H,)
  return s


def _bert_config(**extra):
  return dict(vocab_size=len(BERT_VOCAB), hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              intermediate_size=MLP, max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu", **extra)


def _write(d, state, config=None, vocab=True):
  os.makedirs(d)
  st_numpy.save_file(state, os.path.join(d, "model.safetensors"))
  if config is not None:
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump(config, f)
  if vocab:
    with open(os.path.join(d, "vocab.txt"), "w") as f:
      f.write("\n".join(BERT_VOCAB) + "\n")


def _inputs(rng, regions_padded=True):
  ids, tmask = _text_batch(0, rng, len(BERT_VOCAB))
  r = 3
  feats = rng.normal(0, 1, (3, r, 2048)).astype(np.float32)
  xy = rng.uniform(0, 0.5, (3, r, 2))
  wh = rng.uniform(0.1, 0.5, (3, r, 2))
  boxes = np.concatenate([xy, xy + wh, wh], -1).astype(np.float32)  # [x1, y1, x2, y2, w, h]
  rmask = np.arange(r)[None] < (np.array([[3], [1], [2]]) if regions_padded else 3)
  return ids.astype(np.int32), tmask, np.concatenate([feats, boxes], -1), rmask


def _bert_text(sd, p, ids):
  x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][
      np.arange(ids.shape[1])] + sd[p + "embeddings.token_type_embeddings.weight"][0]
  return _ln(x, sd[p + "embeddings.LayerNorm.weight"], sd[p + "embeddings.LayerNorm.bias"])


def _check(tree, cfg, ref_hidden, ref_pooled, ids, tmask, regions, rmask):
  hidden, mask, pooled = _encode(tree, cfg, ids, tmask, regions, rmask)
  np.testing.assert_allclose(hidden[mask], ref_hidden[mask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)


def _oscar_source(src, rng, use_ln: bool) -> dict:
  """An OSCAR checkpoint directory (safetensors, config.json, vocab.txt) at `src`; its state."""
  shapes = {**_bert_shapes("bert.", len(BERT_VOCAB)), "bert.img_embedding.weight": (H, 2054),
            "bert.img_embedding.bias": (H,), "classifier.weight": (2, H), "classifier.bias": (2,)}
  if use_ln:
    shapes.update({"bert.LayerNorm.weight": (H,), "bert.LayerNorm.bias": (H,)})
  sd = _random_state(shapes, rng)
  config = _bert_config(img_feature_dim=2054, img_feature_type="faster_r-cnn", use_img_layernorm=int(use_ln),
                        img_layer_norm_eps=1e-5)
  _write(src, sd, config)
  return sd


def _check_oscar(dst, meta, sd, rng, use_ln: bool):
  """The converted encoder at `dst` against a numpy forward pass of the OSCAR state `sd`."""
  ids, tmask, regions, rmask = _inputs(rng)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  img = _lin(regions.astype(np.float64), sd64, "bert.img_embedding")  # Linear(2054 -> H) on [f, box]
  if use_ln:
    img = _ln(img, sd64["bert.LayerNorm.weight"], sd64["bert.LayerNorm.bias"], eps=1e-5)
  x = np.concatenate([_bert_text(sd64, "bert.", ids), img], 1)
  mask = np.concatenate([tmask, rmask], 1)
  ref = _np_layers(x, mask, {k[5:]: v for k, v in sd64.items() if k.startswith("bert.")}, BERT_NAMES)
  pooled = np.tanh(_lin(ref[:, 0], sd64, "bert.pooler.dense"))
  _check(pretrained.load_encoder_params(dst), pretrained.encoder_config(meta), ref, pooled,
         ids, tmask, regions, rmask)


@pytest.mark.parametrize("use_ln", [False, True])
def test_oscar_layout_matches_numpy_reference(tmp_path, use_ln):
  rng = np.random.default_rng(0)
  sd = _oscar_source(str(tmp_path / "src"), rng, use_ln)
  meta = convert_lib.convert("oscar", str(tmp_path / "src"), str(tmp_path / "dst"), log=lambda *_: None)
  assert meta["report"]["ignored"] == {"classifier.weight": 1, "classifier.bias": 1} and not meta["report"]["fresh"]
  _check_oscar(str(tmp_path / "dst"), meta, sd, rng, use_ln)


# `python -m rerank.convert` as on a machine without torch: the path finder no longer finds it
# (import torch raises ModuleNotFoundError and find_spec says None, as when it is not installed).
_WITHOUT_TORCH = """
import importlib.machinery, runpy, sys

class _NoTorch(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      return None
    return super().find_spec(name, path, target)

sys.meta_path[:] = [_NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
assert "torch" not in sys.modules
try:
  import torch
  sys.exit("torch is still importable")
except ImportError:
  pass
sys.argv = ["rerank.convert"] + sys.argv[1:]
try:
  runpy.run_module("rerank.convert", run_name="__main__", alter_sys=True)
finally:
  print("torch loaded:", "torch" in sys.modules)
"""


def test_safetensors_conversion_needs_no_torch(tmp_path):
  rng = np.random.default_rng(0)
  sd = _oscar_source(str(tmp_path / "src"), rng, use_ln=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "--family=oscar",
                         f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'dst'}"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "torch loaded: False" in proc.stdout
  meta = pretrained.read_meta(str(tmp_path / "dst"))
  assert meta["report"]["ignored"] == {"classifier.weight": 1, "classifier.bias": 1}
  _check_oscar(str(tmp_path / "dst"), meta, sd, rng, use_ln=True)
  # A torch file there is one line saying what to install or convert, not a traceback.
  shutil.copytree(tmp_path / "src", tmp_path / "bin")
  os.remove(tmp_path / "bin" / "model.safetensors")
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"never read")
  proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "--family=oscar",
                         f"--src={tmp_path / 'bin'}", f"--dst={tmp_path / 'dst2'}"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.startswith("error: ") and "needs torch" in proc.stderr
  assert ".safetensors" in proc.stderr and not os.path.exists(tmp_path / "dst2")


def test_uniter_layout_matches_numpy_reference(tmp_path):
  rng = np.random.default_rng(1)
  p = "uniter."
  shapes = {**_bert_shapes(p, len(BERT_VOCAB)), p + "img_embeddings.img_linear.weight": (H, 2048),
            p + "img_embeddings.img_linear.bias": (H,), p + "img_embeddings.pos_linear.weight": (H, 7),
            p + "img_embeddings.pos_linear.bias": (H,), p + "img_embeddings.mask_embedding.weight": (2, 2048),
            "itm_output.weight": (2, H), "itm_output.bias": (2,)}
  for n in ("img_layer_norm", "pos_layer_norm", "LayerNorm"):
    shapes.update({f"{p}img_embeddings.{n}.weight": (H,), f"{p}img_embeddings.{n}.bias": (H,)})
  sd = _random_state(shapes, rng)
  # As released: the .pt alone; its JSON config and a cased BERT tokenizer live elsewhere.
  _write(str(tmp_path / "src"), sd, vocab=False)
  (tmp_path / "uniter-base.json").write_text(json.dumps(_bert_config()))
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
  (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
  meta = convert_lib.convert("uniter", str(tmp_path / "src"), str(tmp_path / "dst"), log=lambda *_: None,
                             tokenizer_dir=str(tmp_path / "tok"), model_config=str(tmp_path / "uniter-base.json"))
  assert "do_lower_case=False" in meta["tokenizer"]
  assert set(meta["report"]["ignored"]) == {"itm_output.weight", "itm_output.bias", "img_embeddings.mask_embedding"}
  ids, tmask, regions, rmask = _inputs(rng)
  s = {k[len(p):] if k.startswith(p) else k: v.astype(np.float64) for k, v in sd.items()}
  feats, box = regions[..., :2048].astype(np.float64), regions[..., 2048:].astype(np.float64)
  box7 = np.concatenate([box[..., :6], box[..., 4:5] * box[..., 5:6]], -1)  # [x1, y1, x2, y2, w, h, w*h]
  ln = lambda x, n: _ln(x, s[f"img_embeddings.{n}.weight"], s[f"img_embeddings.{n}.bias"])  # noqa: E731
  img = ln(ln(_lin(feats, s, "img_embeddings.img_linear"), "img_layer_norm")
           + ln(_lin(box7, s, "img_embeddings.pos_linear"), "pos_layer_norm")
           + s["embeddings.token_type_embeddings.weight"][1], "LayerNorm")
  x = np.concatenate([_bert_text(s, "", ids), img], 1)
  ref = _np_layers(x, np.concatenate([tmask, rmask], 1), s, BERT_NAMES)
  pooled = np.tanh(_lin(ref[:, 0], s, "pooler.dense"))
  _check(pretrained.load_encoder_params(str(tmp_path / "dst")), pretrained.encoder_config(meta), ref, pooled,
         ids, tmask, regions, rmask)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_m3p_layout_matches_numpy_reference(tmp_path, fmt):
  rng = np.random.default_rng(2)
  v = 30
  shapes = {"embeddings.weight": (v, H), "position_embeddings.weight": (30, H), "layer_norm_emb.weight": (H,),
            "layer_norm_emb.bias": (H,), "image_embeddings.image_embeddings.weight": (H, 2048),
            "image_embeddings.image_embeddings.bias": (H,), "image_embeddings.image_location_embeddings.weight": (H, 5),
            "image_embeddings.image_location_embeddings.bias": (H,), "image_embeddings.LayerNorm.weight": (H,),
            "image_embeddings.LayerNorm.bias": (H,), "pooled_layer.dense.weight": (H, H),
            "pooled_layer.dense.bias": (H,), "seq_relationship.weight": (1, H), "seq_relationship.bias": (1,),
            "encoder_attn.0.q_lin.weight": (H, H)}
  for i in range(LAYERS):
    for key, shape in {"q": (H, H), "k": (H, H), "v": (H, H), "o": (H, H), "i": (MLP, H), "o2": (H, MLP),
                       "ln1": (H,), "ln2": (H,)}.items():
      shapes[M3P_NAMES[key].format(i=i) + ".weight"] = shape
      shapes[M3P_NAMES[key].format(i=i) + ".bias"] = shape[:1]
  sd = _random_state(shapes, rng)
  # M3P's release is a torch {"model": state} under `module.` names; a safetensors copy of it here.
  _write(str(tmp_path / "src"), {"module." + k: val for k, val in sd.items()}, {"n_heads": HEADS}, vocab=False)
  if fmt == "pth":  # as released: torch.save({"model": state}) with DataParallel's `module.` names
    torch = require("torch")
    os.remove(tmp_path / "src" / "model.safetensors")
    torch.save({"model": {"module." + k: torch.from_numpy(val) for k, val in sd.items()}},
               str(tmp_path / "src" / "m3p_under_weights.pth"))
  tok_dir = str(tmp_path / "tok")
  transformers = require("transformers")
  pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
      ("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS[:12])] + [(c, -20.0) for c in "abcdefghijk"] + [("<mask>", 0.0)]
  transformers.XLMRobertaTokenizer(vocab=pieces).save_pretrained(tok_dir)
  meta = convert_lib.convert("m3p", str(tmp_path / "src"), str(tmp_path / "dst"), tokenizer_dir=tok_dir,
                             log=lambda *_: None)
  assert set(meta["report"]["ignored"]) == {"seq_relationship.weight", "seq_relationship.bias", "encoder_attn.0"}
  ids, tmask, regions, _ = _inputs(rng)
  ids = np.where(tmask, ids % v, 1).astype(np.int32)
  rmask = np.ones(regions.shape[:2], bool)  # M3P's own mask assumes unpadded regions
  s = {k: val.astype(np.float64) for k, val in sd.items()}
  feats, box = regions[..., :2048].astype(np.float64), regions[..., 2048:].astype(np.float64)
  loc = np.concatenate([box[..., :4], box[..., 4:5] * box[..., 5:6]], -1)  # [x1, y1, x2, y2, area]
  img = _ln(_lin(feats, s, "image_embeddings.image_embeddings") + _lin(loc, s, "image_embeddings.image_location_embeddings"),
            s["image_embeddings.LayerNorm.weight"], s["image_embeddings.LayerNorm.bias"])
  x = np.concatenate([img, s["embeddings.weight"][ids]], 1)  # regions first
  x = _ln(x + s["position_embeddings.weight"][np.arange(x.shape[1])], s["layer_norm_emb.weight"], s["layer_norm_emb.bias"])
  mask = np.concatenate([rmask, tmask], 1)
  ref = _np_layers(x, mask, s, M3P_NAMES)
  pooled = np.tanh(_lin(ref[:, 0], s, "pooled_layer.dense"))
  cfg = pretrained.encoder_config(meta)
  assert (cfg.order, cfg.positions, cfg.type_vocab_size, meta["cls_token"]) == ("image_first", "sequence", 0, "<s>")
  _check(pretrained.load_encoder_params(str(tmp_path / "dst")), cfg, ref, pooled, ids, tmask, regions, rmask)


def test_safetensors_reader_matches_the_library(tmp_path):
  rng = np.random.default_rng(0)
  state = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float16),
           "c": np.arange(4, dtype=np.int64).reshape(2, 2), "scalar": np.array(2.5, np.float32)}
  path = str(tmp_path / "x.safetensors")
  st_numpy.save_file(state, path)
  ours = dict(pretrained._read_safetensors(path))  # pylint: disable=protected-access
  theirs = st_numpy.load_file(path)
  assert set(ours) == set(theirs)
  for k, v in theirs.items():
    assert ours[k].dtype == v.dtype and ours[k].shape == v.shape
    np.testing.assert_array_equal(ours[k], v)
  assert pretrained.read_state_dict(path)["b"].dtype == np.float32  # floats widen to float32


def test_unexpected_backbone_key_is_an_error_and_heads_are_not(tmp_path):
  rng = np.random.default_rng(4)
  shapes = {**_bert_shapes("", len(BERT_VOCAB)), "encoder.layer.2.output.dense.weight": (H, MLP),
            "cls.predictions.bias": (len(BERT_VOCAB),)}
  _write(str(tmp_path / "src"), _random_state(shapes, rng), _bert_config())
  with pytest.raises(pretrained.ConvertError, match=r"1 unexpected key\(s\): encoder\.layer\.2\.output\.dense\.weight$"):
    convert_lib.convert("bert", str(tmp_path / "src"), str(tmp_path / "dst"), log=lambda *_: None)
  assert not os.path.exists(tmp_path / "dst")


def test_sharded_checkpoint_equals_single_file(tmp_path):
  rng = np.random.default_rng(5)
  state = _random_state(_bert_shapes("", len(BERT_VOCAB)), rng)
  _write(str(tmp_path / "one"), state, _bert_config())
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  keys = sorted(state)
  weight_map = {}
  for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
    name = f"model-{i + 1:05d}-of-00002.safetensors"
    st_numpy.save_file({k: state[k] for k in part}, str(sharded / name))
    weight_map.update({k: name for k in part})
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  (sharded / "config.json").write_text(json.dumps(_bert_config()))
  (sharded / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
  for name in ("one", "sharded"):
    convert_lib.convert("bert", str(tmp_path / name), str(tmp_path / f"{name}_dst"), log=lambda *_: None)
  a = pretrained.load_encoder_params(str(tmp_path / "one_dst"))
  b = pretrained.load_encoder_params(str(tmp_path / "sharded_dst"))
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert len(flat_a) == len(flat_b) == 5 + LAYERS * 16 + 2 + 2  # embeddings, layers, pooler, regions
  for (path, x), (path_b, y) in zip(flat_a, flat_b):
    assert path == path_b
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  assert len(pretrained.read_meta(str(tmp_path / "sharded_dst"))["source"]) == 2

