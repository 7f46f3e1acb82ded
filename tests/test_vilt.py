"""ViLT: parity with transformers' torch ViltModel / ViltForImageAndTextRetrieval, and the converter.

Tiny random HF models are saved with `save_pretrained` (safetensors; a torch .bin once) and
converted with `rerank.convert --family=vilt`. The HF reference for text alone and image alone
is composed from HF's own submodules (ViltModel has no single-modality call). HF samples the
order of an image's patches (torch.multinomial); its `patch_index` output says where each one
sits, so the comparison maps HF's sequence onto our row-major patch grid. Like test_convert,
the tests skip without torch/transformers unless RERANK_REQUIRE_OPTIONAL is set (CI).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from rerank.data import images as images_lib
from rerank.inference import engine
from rerank.models import build
from rerank.models import convert as convert_lib
from rerank.models import pretrained
from rerank.models import vilt
from optional import require  # tests/, on the path as pytest runs these files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "red", "sits", "on", "mat",
         "##s", "the", "park"] + [f"w{i}" for i in range(25)]  # 40 pieces
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
CANVAS = (48, 64)  # one full image and one 32 x 40 image padded into it; 8-pixel patches
QUIET = dict(log=lambda *_: None)



def _randomise(model, torch):
  """Every weight random (HF zero-inits the image [CLS] and positions; LayerNorms start at 1/0)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if "layernorm" in name.lower() and name.endswith("weight") else 0.0
      p.copy_(base + 0.2 * torch.randn_like(p))


def _save(model, root, name, torch, transformers, bin_too=False):
  d = os.path.join(root, name)
  model.save_pretrained(d)
  tok = transformers.BertTokenizer(os.path.join(root, "vocab.txt"), do_lower_case=True)
  tok.save_pretrained(d)
  with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
    json.dump({"do_resize": True, "size": {"shortest_edge": 32}, "size_divisor": 8, "resample": 3,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}, f)
  if bin_too:
    b = d + "_bin"
    shutil.copytree(d, b)
    os.remove(os.path.join(b, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(b, "pytorch_model.bin"))
  return d


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  torch = require("torch")
  transformers = require("transformers")
  torch.manual_seed(0)
  root = str(tmp_path_factory.mktemp("vilt"))
  with open(os.path.join(root, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  config = transformers.ViltConfig(vocab_size=len(VOCAB), image_size=32, patch_size=8,
                                   max_position_embeddings=40, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **SIZES)
  retrieval = transformers.ViltForImageAndTextRetrieval(config).eval()
  _randomise(retrieval, torch)
  bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(VOCAB), max_position_embeddings=40,
                                                        **SIZES)).eval()
  return {"torch": torch, "retrieval": retrieval,
          "retrieval_dir": _save(retrieval, root, "retrieval", torch, transformers),
          "model_dir": _save(retrieval.vilt, root, "model", torch, transformers, bin_too=True),
          "bert_dir": _save(bert, root, "bert", torch, transformers)}


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
  """The retrieval checkpoint converted through the command line."""
  dst = str(tmp_path_factory.mktemp("conv") / "vilt")
  proc = subprocess.run([sys.executable, "-m", "rerank.convert", "--family=vilt",
                         f"--src={hf['retrieval_dir']}", f"--dst={dst}"], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=480)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "rank_output" in proc.stdout
  meta = json.load(open(os.path.join(dst, "model.json")))
  return meta, pretrained.load_encoder_params(dst), dst


def _inputs(seed=0):
  """Two texts (the second padded) and two images (the second 32 x 40 in the 48 x 64 canvas)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, len(VOCAB), (2, 7))
  ids[:, 0] = VOCAB.index("[CLS]")
  ids[1, 4:] = 0
  text_mask = ids != 0
  images = rng.standard_normal((2, *CANVAS, 3)).astype(np.float32)  # NHWC
  image_mask = np.ones((2, *CANVAS), bool)
  image_mask[1, 32:, :] = False
  image_mask[1, :, 40:] = False
  images[~image_mask] = 0.0
  return ids, text_mask, images, image_mask


def _torch_inputs(torch, ids, text_mask, images, image_mask):
  return (torch.tensor(ids), torch.tensor(text_mask.astype(np.int64)),
          torch.tensor(images.transpose(0, 3, 1, 2)), torch.tensor(image_mask.astype(np.int64)))


def _hf_blocks(m, torch, x, mask):
  """HF's encoder and final LayerNorm over embeddings `x` [B, S, H] with a 0/1 `mask` [B, S]."""
  additive = (1.0 - mask.float())[:, None, None, :] * torch.finfo(torch.float32).min
  return m.layernorm(m.encoder(x, attention_mask=additive).last_hidden_state)


def _hf_image_positions(patch_index, image_mask_seq, cols):
  """[B, 1 + N'] HF image sequence positions -> our row-major index, -1 where HF pads."""
  pi = patch_index.numpy()
  ours = 1 + pi[..., 0] * cols + pi[..., 1]
  ours = np.where(image_mask_seq.numpy()[:, 1:] > 0, ours, -1)
  return np.concatenate([np.zeros((pi.shape[0], 1), np.int64), ours], axis=1)


def _gather_ours(ours, positions):
  """Our hidden states [B, S, H] at HF's valid image positions -> [B, S_hf, H], zeros at HF padding."""
  out = np.take_along_axis(ours, np.maximum(positions, 0)[..., None], axis=1)
  return np.where(positions[..., None] >= 0, out, 0.0)


def _apply(tree, cfg, method, *args, **kwargs):
  """vilt.Model(cfg).apply(...) under jit (on a loaded CPU several times faster than op by op)."""
  fn = jax.jit(lambda t, a, k: vilt.Model(cfg).apply({"params": t}, *a, method=method, **k))
  return jax.tree_util.tree_map(np.asarray, fn(tree, args, kwargs))


def test_text_image_and_joint_hidden_states_match_transformers(hf, converted):
  torch, m = hf["torch"], hf["retrieval"].vilt
  meta, tree, _ = converted
  cfg = vilt.Config.from_dict(meta["model"])
  ids, tmask, images, imask = _inputs()
  t_ids, t_tmask, t_images, t_imask = _torch_inputs(torch, ids, tmask, images, imask)
  emb = m.embeddings
  cols = CANVAS[1] // 8
  with torch.no_grad():
    # Text alone: BERT embeddings + modality 0.
    x = emb.text_embeddings(input_ids=t_ids) + emb.token_type_embeddings(torch.zeros_like(t_ids))
    want_text = _hf_blocks(m, torch, x, t_tmask).numpy()
    # Image alone: HF's patch embedding (with its sampling) + modality 1.
    torch.manual_seed(1)
    x, xm, (patch_index, _) = emb.visual_embed(t_images, t_imask, max_image_length=-1)
    want_image = _hf_blocks(m, torch, x + emb.token_type_embeddings(torch.ones_like(xm)), xm).numpy()
    image_pos = _hf_image_positions(patch_index, xm, cols)
    # Joint: the model itself, with the same draws for the patch order.
    torch.manual_seed(2)
    _, joint_xm, (joint_index, _) = emb.visual_embed(t_images, t_imask, max_image_length=-1)
    torch.manual_seed(2)
    out = m(input_ids=t_ids, attention_mask=t_tmask, pixel_values=t_images, pixel_mask=t_imask)
    logits = hf["retrieval"](input_ids=t_ids, attention_mask=t_tmask, pixel_values=t_images,
                             pixel_mask=t_imask).logits.numpy()
  hidden, mask = _apply(tree, cfg, vilt.Model.encode, ids.astype(np.int32), tmask)
  np.testing.assert_allclose(hidden[tmask], want_text[tmask], atol=1e-4, rtol=0)
  hidden, mask = _apply(tree, cfg, vilt.Model.encode, images=images, image_mask=imask)
  # Every valid patch of each image is in both sequences, once.
  assert mask.sum(1).tolist() == [1 + 6 * 8, 1 + 4 * 5] == (image_pos >= 0).sum(1).tolist()
  valid = image_pos >= 0
  np.testing.assert_allclose(_gather_ours(hidden, image_pos)[valid], want_image[valid], atol=1e-4, rtol=0)
  hidden, mask = _apply(tree, cfg, vilt.Model.encode, ids.astype(np.int32), tmask, images, imask)
  # HF's joint sequence is [text; image CLS; patches in its drawn order]: map it onto ours.
  text_pos = np.where(tmask, np.arange(ids.shape[1]), -1)
  image_pos = _hf_image_positions(joint_index, joint_xm, cols)
  pos = np.concatenate([text_pos, np.where(image_pos >= 0, ids.shape[1] + image_pos, -1)], axis=1)
  valid = pos >= 0
  np.testing.assert_allclose(_gather_ours(hidden, pos)[valid], out.last_hidden_state.numpy()[valid],
                             atol=1e-4, rtol=0)
  pooled = _apply(tree, cfg, vilt.Model.pool, hidden)
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=0)
  scores = _apply(tree, cfg, vilt.Model.score_pairs, ids.astype(np.int32), tmask, images, imask)
  np.testing.assert_allclose(scores[:, 1], logits[:, 0], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(scores[:, 0], 0.0)
  assert meta["has_ce_head"] and "ce_head/kernel" not in meta["report"]["fresh"]


def test_engine_restores_the_converted_checkpoint(hf, converted):
  """restore() -> Engine on tokenized captions: the CE score is HF's retrieval logit."""
  torch = hf["torch"]
  restored = engine.restore(converted[2])
  assert restored.mode.has_be and restored.mode.has_ce and restored.image == converted[0]["image"]
  ids, tmask = restored.text_inputs(["a red dog sits on the mat", "the cat"])
  _, _, images, imask = _inputs(seed=4)
  eng = restored.engine(batch_size=2)
  t_ids, t_tmask, t_images, t_imask = _torch_inputs(torch, ids.astype(np.int64), tmask, images, imask)
  with torch.no_grad():
    want = hf["retrieval"](input_ids=t_ids, attention_mask=t_tmask, pixel_values=t_images,
                           pixel_mask=t_imask).logits[:, 0]
  np.testing.assert_allclose(eng.score_pairs(ids, tmask, images, imask), want.numpy(), atol=1e-4, rtol=0)
  emb = eng.embed_images(images, imask)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_bi_encoder_pooling_mean_and_cls(hf, converted):
  """BE embeddings: masked mean over the valid outputs, or the first token's, per Config.pooling."""
  meta, tree, _ = converted
  ids, tmask, images, imask = _inputs(seed=3)
  cfg = vilt.Config.from_dict(meta["model"])
  assert cfg.pooling == "mean"
  text, text_mask = _apply(tree, cfg, vilt.Model.encode, ids.astype(np.int32), tmask)
  image, image_mask = _apply(tree, cfg, vilt.Model.encode, images=images, image_mask=imask)
  mean = lambda h, m: (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(_apply(tree, cfg, vilt.Model.embed_text, ids.astype(np.int32), tmask),
                             mean(text, text_mask), atol=1e-5, rtol=0)
  padded = _apply(tree, cfg, vilt.Model.embed_image, images, imask)
  np.testing.assert_allclose(padded, mean(image, image_mask), atol=1e-5, rtol=0)
  cls = dataclasses.replace(cfg, pooling="cls")
  np.testing.assert_allclose(_apply(tree, cls, vilt.Model.embed_image, images, imask), image[:, 0],
                             atol=1e-5, rtol=0)
  # Padding is invisible: the 32 x 40 image alone on its own 32 x 40 canvas embeds the same.
  alone = _apply(tree, cfg, vilt.Model.embed_image, images[1:, :32, :40], imask[1:, :32, :40])
  np.testing.assert_allclose(alone, padded[1:], atol=1e-5, rtol=0)


def test_converted_directory_has_image_settings_tokenizer_and_canvas(hf, converted):
  meta, _, _ = converted
  assert meta["family"] == "vilt" and meta["key_prefix"] == "vilt."
  assert meta["image"] == {"kind": "vilt", "size": 32, "max_size": 53, "size_divisor": 8,
                           "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "resample": "bicubic",
                           "rescale": 1 / 255}
  cfg = vilt.Config.from_dict(meta["model"])
  assert (cfg.max_image_height, cfg.max_image_width) == (48, 48)  # 53 rounded down to 8s
  assert meta["cls_token_id"] == VOCAB.index("[CLS]") and meta["pad_token_id"] == 0
  images, mask = vilt.example_images(cfg, 3)
  assert images.shape == (3, 48, 48, 3) and mask.shape == (3, 48, 48) and bool(mask.all())
  # The data layer reads it as the same spec it derives from preprocessor_config.json itself.
  with open(os.path.join(hf["retrieval_dir"], "preprocessor_config.json")) as f:
    spec = images_lib.ImageSpec.from_hf(json.load(f), "vilt")
  assert images_lib.ImageSpec.from_dict(meta["image"]) == spec
  assert spec.canvas == (cfg.max_image_height, cfg.max_image_width)


def test_plain_vilt_model_gets_a_fresh_head_and_bin_equals_safetensors(hf, tmp_path):
  a = convert_lib.convert("vilt", hf["model_dir"], str(tmp_path / "st"), **QUIET)
  b = convert_lib.convert("vilt", hf["model_dir"] + "_bin", str(tmp_path / "bin"), **QUIET)
  assert not a["has_ce_head"] and a["key_prefix"] == ""
  assert a["report"]["fresh"] == ["ce_head/bias", "ce_head/kernel"] == b["report"]["fresh"]
  ta, tb = (pretrained.load_encoder_params(str(tmp_path / n)) for n in ("st", "bin"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, ta, tb)
  with pytest.raises(pretrained.ConvertError, match="already exists"):
    convert_lib.convert("vilt", hf["model_dir"], str(tmp_path / "st"), **QUIET)


def test_missing_unexpected_and_misshaped_keys_in_one_error(hf, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(hf["retrieval_dir"], bad)
  state = st_numpy.load_file(str(bad / "model.safetensors"))
  del state["vilt.encoder.layer.1.output.dense.bias"]
  state["vilt.encoder.layer.0.extra.weight"] = np.zeros((2, 2), np.float32)
  state["vilt.pooler.dense.bias"] = np.zeros((16,), np.float32)
  del state["rank_output.bias"]
  st_numpy.save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
  dst = tmp_path / "out"
  with pytest.raises(pretrained.ConvertError) as e:
    convert_lib.convert("vilt", str(bad), str(dst), **QUIET)
  msg = str(e.value)
  assert "2 missing key(s): vilt.encoder.layer.1.output.dense.bias; rank_output.bias" in msg, msg
  assert "1 unexpected key(s): vilt.encoder.layer.0.extra.weight" in msg, msg
  assert "1 mis-shaped key(s): vilt.pooler.dense.bias: checkpoint (16,), config implies (32,)" in msg, msg
  assert not dst.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_wrong_family_suggests_the_right_one(hf, tmp_path):
  with pytest.raises(pretrained.ConvertError, match=r"missing.*patch_embeddings.*--family=bert"):
    convert_lib.convert("vilt", hf["bert_dir"], str(tmp_path / "a"), **QUIET)
  with pytest.raises(pretrained.ConvertError, match=r"--family=vilt"):
    convert_lib.convert("bert", hf["retrieval_dir"], str(tmp_path / "b"), **QUIET)
  with pytest.raises(pretrained.ConvertError, match=r"--family=vilt"):
    convert_lib.convert("bert", hf["model_dir"], str(tmp_path / "c"), **QUIET)
  with pytest.raises(pretrained.ConvertError, match=r"--family: expected one of .*vilt"):
    convert_lib.convert("vit", hf["model_dir"], str(tmp_path / "d"), **QUIET)


def test_config_from_dict_names_the_bad_field():
  with pytest.raises(ValueError, match=r"model\.hidden: expected one of the ViLT fields"):
    vilt.Config.from_dict({"hidden": 8})
  with pytest.raises(ValueError, match=r"model\.pooling: expected one of mean, cls; found 'max'"):
    vilt.Config.from_dict({"pooling": "max"})
  with pytest.raises(ValueError, match=r"model\.patch_size: expected an integer >= 1; found 0"):
    vilt.Config.from_dict({"patch_size": 0})
  assert vilt.Config.from_dict(dataclasses.asdict(vilt.Config())) == vilt.Config()


def test_init_from_loads_the_whole_tree_and_keeps_runtime_fields(converted):
  """config.init_from a converted ViLT: sizes from model.json, pooling from config.model."""
  meta, tree, dst = converted
  config = ml_collections.ConfigDict({
      "mode": "joint_sum", "max_text_len": 12, "init_from": dst,
      "model": {"family": "vilt", "hidden_size": 999, "pooling": "cls", "dtype": "float32"}})
  model = build.build_model(config, cls_token_id=2, vocab_size=len(VOCAB))
  assert model.cfg == dataclasses.replace(vilt.Config.from_dict(meta["model"]), pooling="cls")
  # Shapes only: what with_pretrained_encoder checks (the values are replaced anyway).
  params = jax.eval_shape(lambda r: build.init_params(model, config, r), jax.random.PRNGKey(0))
  loaded = build.with_pretrained_encoder(params, tree, config.mode, whole=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, tree)
