"""BLIP: parity with transformers' BlipForImageTextRetrieval after `rerank.convert`, and errors.

A tiny random HF model (vision 48 wide so that a text/vision width mix-up cannot hide in square
matrices; text 32 wide; 32 x 32 images in 8 x 8 patches; ITC width 16) is saved with
`save_pretrained` (safetensors, and a torch .bin copy), converted, and compared in float32:
ITC embeddings of both sides and ITM logits within 1e-4, the cached-image-states path equal
to the direct one. Skips without torch/transformers unless RERANK_REQUIRE_OPTIONAL is set.
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

from rerank.data import datasets
from rerank.data import images as images_lib
from rerank.inference import engine
from rerank.models import blip
from rerank.models import build
from rerank.models import convert as convert_lib
from rerank.models import pretrained
from optional import require  # tests/, on the path as pytest runs these files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "dog", "cat", "red", "blue", "sits", "on",
         "mat", "##s", "big", "small", "runs", "park", "in"]
CAPTIONS = ["the red dog sits on a mat", "a small cat", "[ENC] blue cats runs in the park", "dog"]
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16)
VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
              image_size=32, patch_size=8)
TOL = 1e-4
quiet = dict(log=lambda *_: None)



@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(torch model, HF tokenizer, safetensors dir, .bin dir, converted dir)."""
  torch = require("torch")
  transformers = require("transformers")
  root = tmp_path_factory.mktemp("blip")
  (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  # As BLIP's processor: BERT WordPiece plus [DEC] (bos) and [ENC].
  tok = transformers.BertTokenizer(str(root / "vocab.txt"), do_lower_case=True, bos_token="[DEC]",
                                   additional_special_tokens=["[ENC]"])
  config = transformers.BlipConfig(text_config=dict(vocab_size=len(tok), **TEXT), vision_config=VISION,
                                   image_text_hidden_size=16)
  torch.manual_seed(0)
  model = transformers.BlipForImageTextRetrieval(config).eval()
  with torch.no_grad():  # every tensor away from its init (LayerNorm 1/0, tiny ViT embeddings)
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  st_dir, bin_dir = root / "hf", root / "hf_bin"
  model.save_pretrained(st_dir)
  tok.save_pretrained(st_dir)
  transformers.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(st_dir)
  shutil.copytree(st_dir, bin_dir)
  (bin_dir / "model.safetensors").unlink()
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  dst = root / "converted"
  proc = subprocess.run([sys.executable, "-m", "rerank.convert", "--family=blip", f"--src={st_dir}",
                         f"--dst={dst}"], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=480)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return model, tok, str(st_dir), str(bin_dir), str(dst)


def _inputs(tok):
  enc = tok(CAPTIONS, padding="max_length", max_length=12, return_tensors="np")
  pixels = np.random.default_rng(0).standard_normal((len(CAPTIONS), 3, 32, 32)).astype(np.float32)
  return enc["input_ids"], enc["attention_mask"], pixels  # NCHW, as HF takes them


def _converted(dst):
  meta = pretrained.read_meta(dst)
  model = blip.Model(blip.Config.from_dict(meta["model"]))
  return model, {"params": pretrained.load_encoder_params(dst)}, meta


def test_itc_and_itm_match_transformers(hf):
  torch = require("torch")
  hf_model, tok, _, _, dst = hf
  ids, mask, pixels = _inputs(tok)
  with torch.no_grad():
    t_ids, t_mask, t_pix = torch.tensor(ids), torch.tensor(mask), torch.tensor(pixels)
    itm = hf_model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pix).itm_score.numpy()
    image_states = hf_model.vision_model(pixel_values=t_pix).last_hidden_state
    text_states = hf_model.text_encoder(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
    img_emb = torch.nn.functional.normalize(hf_model.vision_proj(image_states[:, 0]), dim=-1).numpy()
    txt_emb = torch.nn.functional.normalize(hf_model.text_proj(text_states[:, 0]), dim=-1).numpy()
    # The ITC similarity transformers returns without the ITM head is these embeddings' product.
    sims = hf_model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pix, use_itm_head=False).itm_score
  np.testing.assert_allclose(img_emb @ txt_emb.T, sims.numpy(), atol=1e-5)
  model, variables, _ = _converted(dst)
  images, image_mask = pixels.transpose(0, 2, 3, 1), np.ones((len(CAPTIONS), 32, 32), bool)
  ours_txt = model.apply(variables, ids, mask.astype(bool), method=model.embed_text)
  ours_img = model.apply(variables, images, image_mask, method=model.embed_image)
  ours_itm = model.apply(variables, ids, mask.astype(bool), images, image_mask, method=model.score_pairs)
  np.testing.assert_allclose(ours_txt, txt_emb, atol=TOL)
  np.testing.assert_allclose(ours_img, img_emb, atol=TOL)
  np.testing.assert_allclose(ours_itm, itm, atol=TOL)
  assert np.ptp(itm[:, 1]) > 10 * TOL  # the pairs score differently: a constant would not pass
  np.testing.assert_allclose(model.apply(variables, images, image_mask, method=model.image_states),
                             image_states.numpy(), atol=TOL)


def test_cached_image_states_equal_the_direct_path(hf):
  _, tok, _, _, dst = hf
  ids, mask, pixels = _inputs(tok)
  model, variables, _ = _converted(dst)
  images, image_mask = pixels.transpose(0, 2, 3, 1), np.ones((len(CAPTIONS), 32, 32), bool)
  states = model.apply(variables, images, image_mask, method=model.image_states)  # [B, P+1, Dv]
  assert states.shape == (len(CAPTIONS), 17, 48)
  direct = model.apply(variables, ids, mask.astype(bool), images, image_mask, method=model.score_pairs)
  cached = model.apply(variables, ids, mask.astype(bool), states, method=model.score_pairs_from_states)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(direct))
  np.testing.assert_array_equal(model.apply(variables, states, method=model.embed_image_from_states),
                                model.apply(variables, images, image_mask, method=model.embed_image))
  # One caption against every cached image, as a rerank query over k candidates.
  k = len(CAPTIONS)
  one = model.apply(variables, np.repeat(ids[:1], k, 0), np.repeat(mask[:1], k, 0).astype(bool), states,
                    method=model.score_pairs_from_states)
  np.testing.assert_allclose(one[0], direct[0], atol=1e-6)
  assert not np.allclose(one[1:, 1], one[0, 1])


def test_bin_checkpoint_converts_to_the_same_parameters(hf, tmp_path):
  _, _, _, bin_dir, dst = hf
  convert_lib.convert("blip", bin_dir, str(tmp_path / "from_bin"), **quiet)
  a, b = pretrained.load_encoder_params(dst), pretrained.load_encoder_params(str(tmp_path / "from_bin"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_converted_directory_carries_tokenizer_image_settings_and_heads(hf):
  _, tok, _, _, dst = hf
  meta = json.load(open(os.path.join(dst, "model.json")))
  assert meta["family"] == "blip" and meta["has_ce_head"] is True
  assert meta["image"] == {"kind": "blip", "size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711], "resample": "bicubic"}
  assert meta["cls_token_id"] == tok.cls_token_id and meta["report"]["fresh"] == []
  assert meta["special_tokens"]["[ENC]"] == tok.convert_tokens_to_ids("[ENC]") == len(VOCAB) + 1
  ours = datasets.tokenize(datasets.load_tokenizer(dst), CAPTIONS, 12)
  ids, mask, _ = _inputs(tok)
  np.testing.assert_array_equal(ours[0], ids)  # [ENC] stays one token, as in transformers
  np.testing.assert_array_equal(ours[1], mask.astype(bool))
  restored = engine.restore_converted(dst)
  assert restored.mode.name == "joint_sum" and restored.image == meta["image"]
  assert engine.embed_dim(restored.model) == 16


def test_a_config_builds_the_tree_that_init_from_replaces(hf):
  _, _, _, _, dst = hf
  meta = pretrained.read_meta(dst)
  fields = {k: v for k, v in meta["model"].items() if k != "vocab_size"}
  config = ml_collections.ConfigDict(dict(mode="joint_alternate", max_text_len=12, max_regions=0,
                                          model=dict(family="blip", head_dropout=0.1, **fields)))
  model = build.build_model(config, cls_token_id=2, vocab_size=meta["vocab_size"])
  # Shapes only (tracing, no compiling): with_pretrained_encoder checks paths and shapes.
  params = jax.eval_shape(lambda r: build.init_params(model, config, r), jax.random.PRNGKey(0))
  converted = pretrained.load_encoder_params(dst)
  loaded = build.with_pretrained_encoder(params, converted, config.mode, whole=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, converted)


# ------------------------------------------------------------------ errors


def test_missing_unexpected_and_misshaped_keys_in_one_error(hf, tmp_path):
  _, _, st_dir, _, _ = hf
  bad = tmp_path / "bad"
  shutil.copytree(st_dir, bad)
  state = st_numpy.load_file(str(bad / "model.safetensors"))
  del state["text_encoder.encoder.layer.1.crossattention.self.key.weight"]
  state["itm_head.extra"] = np.zeros(3, np.float32)
  state["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((80, 48), np.float32)
  st_numpy.save_file(state, str(bad / "model.safetensors"))
  dst = tmp_path / "out"
  with pytest.raises(pretrained.ConvertError) as e:
    convert_lib.convert("blip", str(bad), str(dst), **quiet)
  msg = str(e.value)
  assert "1 missing key(s): text_encoder.encoder.layer.1.crossattention.self.key.weight" in msg
  assert "1 unexpected key(s): itm_head.extra" in msg
  assert "1 mis-shaped key(s): vision_model.encoder.layers.0.mlp.fc1.weight: checkpoint (80, 48), " \
         "config implies (96, 48)" in msg
  assert "--family" not in msg  # still BLIP's keys: no other family to suggest
  config = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**config, "architectures": ["BlipForConditionalGeneration"]}))
  with pytest.raises(pretrained.ConvertError, match=r"names BlipForConditionalGeneration; --family=blip "
                     r"converts BlipForImageTextRetrieval checkpoints"):
    convert_lib.convert("blip", str(bad), str(dst), **quiet)
  assert not dst.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_the_right_family_is_suggested(hf, tmp_path):
  transformers = require("transformers")
  _, tok, st_dir, _, _ = hf
  # BLIP's config.json has no top-level BERT sizes: the bert reader fails first, with the hint.
  with pytest.raises(pretrained.ConvertError, match=r"missing field.*try --family=blip\."):
    convert_lib.convert("bert", st_dir, str(tmp_path / "a"), **quiet)
  bert_dir = tmp_path / "bert"
  transformers.BertModel(transformers.BertConfig(vocab_size=len(tok), **TEXT)).save_pretrained(bert_dir)
  tok.save_pretrained(bert_dir)
  with pytest.raises(pretrained.ConvertError, match=r"model_type: expected 'blip'.*try --family=bert\."):
    convert_lib.convert("blip", str(bert_dir), str(tmp_path / "b"), **quiet)


def test_cli_prints_one_error_line(hf, tmp_path):
  _, _, st_dir, _, _ = hf
  proc = subprocess.run([sys.executable, "-m", "rerank.convert", "--family=oscar", f"--src={st_dir}",
                         f"--dst={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=480)
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(lines) == 1 and "--family=blip" in lines[0], proc.stderr[-2000:]


def test_config_from_dict_names_the_bad_field():
  cfg = blip.Config(vocab_size=10, hidden_size=32, num_heads=4, image_size=32, patch_size=8)
  assert blip.Config.from_dict(dataclasses.asdict(cfg)) == cfg and cfg.embed_dim == 256
  for change, field in ((dict(colour=1), "model.colour"), (dict(patch_size=7), "model.image_size"),
                        (dict(num_heads=5), "model.hidden_size"), (dict(dtype="int8"), "model.dtype"),
                        (dict(vision_num_layers=0), "model.vision_num_layers")):
    with pytest.raises(ValueError, match=field):
      blip.Config.from_dict({**dataclasses.asdict(cfg), **change})
  images, mask = blip.example_images(cfg, 2)
  assert images.shape == (2, 32, 32, 3) and mask.shape == (2, 32, 32) and bool(mask.all())


def test_trainer_losses_run_on_blip_and_the_be_side_never_reads_the_itm_parts(hf):
  """The trainer's BE loss (ITC) and CE loss (ITM) take BLIP as any model. The BE loss runs on
  parameters without any cross-attention block or ITM head: the text-only pass shares only the
  self-attention and feed-forward weights with the image-grounded one."""
  from rerank.training import losses  # pylint: disable=import-outside-toplevel
  from rerank.training import steps  # pylint: disable=import-outside-toplevel
  _, tok, _, _, dst = hf
  ids, mask, pixels = _inputs(tok)
  model, variables, meta = _converted(dst)
  model = blip.Model(model.cfg, head_dropout=0.0)  # the converted config has no dropout either
  params = variables["params"]
  text = {name: {k: v for k, v in part.items() if k != "crossattention"} if name.startswith("layer_") else part
          for name, part in params["text"].items()}
  be_params = {**{k: v for k, v in params.items() if k != "itm_head"}, "text": text}
  n = len(CAPTIONS)
  batch = dict(token_ids=ids, text_mask=mask.astype(bool), regions=pixels.transpose(0, 2, 3, 1),
               region_mask=np.ones((n, 32, 32), bool), image_ids=np.arange(n), labels=np.array([1, 0, 1, 0]))
  config = ml_collections.ConfigDict(dict(loss=dict(be="infonce", temperature=0.05, margin=0.1)))
  key = jax.random.PRNGKey(0)
  be, _ = steps.be_loss(model, config, be_params, batch, key)
  txt = model.apply(variables, batch["token_ids"], batch["text_mask"], method=model.embed_text)
  img = model.apply(variables, batch["regions"], batch["region_mask"], method=model.embed_image)
  np.testing.assert_allclose(be, losses.infonce_loss(txt, img, batch["image_ids"], batch["image_ids"],
                                                     temperature=0.05), rtol=1e-5)
  ce, _ = steps.ce_loss(model, params, batch, key)
  logits = model.apply(variables, batch["token_ids"], batch["text_mask"], batch["regions"],
                       batch["region_mask"], method=model.score_pairs)
  np.testing.assert_allclose(ce, losses.cross_entropy_loss(logits, batch["labels"]), rtol=1e-5)
  with pytest.raises(Exception, match="crossattention"):  # the CE side does need them
    steps.ce_loss(model, be_params, batch, key)


def test_blips_itm_plus_itc_sum_is_the_combination_fusion_at_half_weight():
  """BLIP ranks its top k by ITM match logit + ITC cosine; `combination` with w = 0.5 is half
  that sum, so it orders every query's candidates the same way."""
  from rerank.indexing import ranking  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  ce, be = rng.standard_normal((50, 20)) * 3, rng.uniform(-1, 1, (50, 20))
  fused = ranking.fuse(ce, be, "combination", 0.5)
  np.testing.assert_allclose(fused, (ce + be) / 2)
  np.testing.assert_array_equal(np.argsort(-fused, 1), np.argsort(-(ce + be), 1))


def test_photos_through_our_preprocessing_score_as_in_transformers(hf):
  """JPEG-like photos end to end: model.json's image settings are those transformers reads from
  preprocessor_config.json, and our preprocessing + model give HF processor + model's ITM logits."""
  torch = require("torch")
  transformers = require("transformers")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  hf_model, tok, st_dir, _, dst = hf
  meta = pretrained.read_meta(dst)
  spec = images_lib.ImageSpec.from_dict(meta["image"])
  with open(os.path.join(st_dir, "preprocessor_config.json")) as f:
    assert spec == images_lib.ImageSpec.from_hf(json.load(f), "blip")
  rng = np.random.default_rng(1)
  photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (33, 20))]
  pixels, pixel_mask = images_lib.preprocess(photos, spec)  # [2, 32, 32, 3], [2, 32, 32]
  ids, mask, _ = _inputs(tok)
  ids, mask = ids[:2], mask[:2]
  processor = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32})
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(processor(photos, return_tensors="np")["pixel_values"])).itm_score
  model, variables, _ = _converted(dst)
  ours = model.apply(variables, ids, mask.astype(bool), pixels, pixel_mask, method=model.score_pairs)
  np.testing.assert_allclose(ours, theirs.numpy(), atol=TOL)
