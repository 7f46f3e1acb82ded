"""Encode CLI and init_from: embeddings equal the model's masked mean, from both checkpoint kinds."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from rerank.models import build

from rerank.training import checkpoints
from rerank.models import convert as convert_lib
from rerank import encode
from rerank.inference import engine
from rerank.training import steps
from rerank.data import datasets
from rerank.models import encoder as encoder_lib
from rerank.models import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402

H, LAYERS, MLP = 32, 2, 64
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "red", "blue", "green", "cube", "sphere",
         "left", "of", "right", "small", "large", "metal", "rubber", "cylinder", "is", "and", "behind", "front"]


def _bert_dir(path, max_pos=64):
  """A tiny random BERT checkpoint (plain BertModel key names) with config.json and vocab.txt."""
  rng = np.random.default_rng(0)
  shapes = {"embeddings.word_embeddings.weight": (len(VOCAB), H), "embeddings.position_embeddings.weight": (max_pos, H),
            "embeddings.token_type_embeddings.weight": (2, H), "pooler.dense.weight": (H, H), "pooler.dense.bias": (H,)}
  for n in ("embeddings.LayerNorm",):
    shapes.update({n + ".weight": (H,), n + ".bias": (H,)})
  for i in range(LAYERS):
    k = f"encoder.layer.{i}."
    for name, shape in (("attention.self.query", (H, H)), ("attention.self.key", (H, H)),
                        ("attention.self.value", (H, H)), ("attention.output.dense", (H, H)),
                        ("intermediate.dense", (MLP, H)), ("output.dense", (H, MLP)),
                        ("attention.output.LayerNorm", (H,)), ("output.LayerNorm", (H,))):
      shapes[k + name + ".weight"], shapes[k + name + ".bias"] = shape, shape[:1]
  state = {k: (rng.normal(0, 0.2, s) + (k.endswith("LayerNorm.weight"))).astype(np.float32) for k, s in shapes.items()}
  os.makedirs(path)
  st_numpy.save_file(state, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(vocab_size=len(VOCAB), hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                   intermediate_size=MLP, max_position_embeddings=max_pos), f)
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB) + "\n")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("enc")
  _bert_dir(str(root / "src"))
  convert_lib.convert("bert", str(root / "src"), str(root / "conv"), log=lambda *_: None)
  return str(root / "conv")


def _reference_text(conv, texts, max_len=72):
  meta = pretrained.read_meta(conv)
  cfg = pretrained.encoder_config(meta)
  ids, mask = datasets.tokenize(datasets.load_tokenizer(conv), texts, max_len)
  hidden, m, _ = encoder_lib.Encoder(cfg).apply({"params": pretrained.load_encoder_params(conv)}, ids, mask)
  m = np.asarray(m, np.float32)[..., None]
  return (np.asarray(hidden) * m).sum(1) / m.sum(1), ids


def embed_texts(path, texts, batch_size=64):
  """Raw (unnormalised) BE text embeddings through the engine, as `rerank.encode` computes them."""
  m = engine.restore(path)
  return m.engine(batch_size, normalize=False).embed_texts(*m.text_inputs(texts))


def test_encode_cli_texts_match_the_masked_mean(converted, tmp_path):
  texts = ["a red cube", "the large metal sphere is left of a small blue cylinder", "green", "",
           "Red CUBE behind the sphere"]
  (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
  out = tmp_path / "t.npy"
  proc = subprocess.run([sys.executable, "-m", "rerank.encode", f"--checkpoint={converted}",
                         f"--texts={tmp_path / 't.txt'}", f"--out={out}", "--batch_size=2"],
                        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  got = np.load(out)
  want, ids = _reference_text(converted, texts)
  assert got.dtype == np.float32 and got.shape == (5, H)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert ids[4, 1] == VOCAB.index("red")  # uncased vocabulary -> lower-cased input
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_images_use_the_mask_and_batching_does_not_matter(converted, tmp_path):
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(5, 4, 2054)).astype(np.float32)
  num = np.array([4, 1, 2, 3, 4])
  path = str(tmp_path / "img.npz")
  np.savez(path, features=feats, num_regions=num)
  m = engine.restore(converted)
  got = m.engine(2, normalize=False).embed_images(*m.image_inputs(*encode.read_images(path)))
  # Garbage in the padded regions, another batch size: the same embeddings.
  padded = np.where((np.arange(4)[None] < num[:, None])[..., None], feats, 9.0)
  again = m.engine(8, normalize=False).embed_images(
      *m.image_inputs(padded, np.arange(4)[None] < num[:, None]))
  np.testing.assert_allclose(got, again, atol=1e-5)
  # Reference: [CLS] then the valid regions, masked mean over all of them.
  cfg = pretrained.encoder_config(pretrained.read_meta(converted))
  tree = pretrained.load_encoder_params(converted)
  for i in range(5):
    hidden, _, _ = encoder_lib.Encoder(cfg).apply({"params": tree}, np.array([[2]], np.int32), np.ones((1, 1), bool),
                                                  feats[i:i + 1, :num[i]], np.ones((1, num[i]), bool))
    np.testing.assert_allclose(got[i], np.asarray(hidden)[0].mean(0), atol=1e-5)
  with pytest.raises(ValueError, match=r"expected \[N, R, 2054\]"):
    m.image_inputs(feats[..., :100])


def test_encode_reads_a_trained_workdir(tmp_path):
  config = demo.get_config("runlocal,mode=separate")
  workdir = str(tmp_path / "wd")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  tok = datasets.get_tokenizer(config)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  tx = steps.optimizer(config)
  state = jax.jit(functools.partial(steps.init_train_state, model, config, tx))(jax.random.PRNGKey(5))
  ckpts = checkpoints.Checkpoints(workdir, async_save=False)
  ckpts.save(3, state)
  ckpts.wait()
  ckpts.close()
  texts = ["a red cube", "a small blue sphere"]
  got = embed_texts(workdir, texts)
  ids, mask = datasets.tokenize(tok, texts, config.max_text_len)
  want = model.apply({"params": state["params"]["be"]}, ids, mask, method=model.embed_text)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


def test_encode_errors(tmp_path, converted):
  (tmp_path / "t.txt").write_text("a\n")
  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-m", "rerank.encode", f"--checkpoint={tmp_path}",
                         f"--texts={tmp_path / 't.txt'}", f"--out={tmp_path / 'o.npy'}"],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode != 0 and "neither a converted checkpoint" in proc.stderr
  assert not (tmp_path / "o.npy").exists()


def test_init_from_loads_the_encoder_and_keeps_a_fresh_ce_head(converted):
  config = demo.get_config("runlocal,mode=joint_alternate")
  config.init_from = converted
  tok = datasets.get_tokenizer(config)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  assert model.cfg.hidden_size == H and model.cls_token_id == VOCAB.index("[CLS]")
  tx = steps.optimizer(config)
  state = jax.jit(functools.partial(steps.init_train_state, model, config, tx))(jax.random.PRNGKey(0))
  params = build.with_pretrained_encoder(state["params"], pretrained.load_encoder_params(converted), config.mode)
  flat_new = dict(jax.tree_util.tree_flatten_with_path(params["encoder"])[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(pretrained.load_encoder_params(converted))[0]:
    np.testing.assert_array_equal(np.asarray(flat_new[path]), leaf)
  np.testing.assert_array_equal(params["ce_head"]["kernel"], state["params"]["ce_head"]["kernel"])
  config.max_text_len = 80  # more than the checkpoint's 64 positions
  with pytest.raises(ValueError, match="64 positions"):
    build.build_model(config, 0, 0)


def test_train_cli_with_init_from(converted, tmp_path):
  workdir = str(tmp_path / "wd")
  # BE mode keeps the compile small; the joint modes share the same init_from path.
  proc = subprocess.run([sys.executable, "-m", "rerank.train", "--config=configs/demo.py:runlocal,mode=be",
                         f"--workdir={workdir}", f"--config.init_from={converted}", "--config.total_steps=2",
                         "--config.eval_every=0"], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=480)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "init_from" in proc.stdout and "ce_head freshly initialised" in proc.stdout
  assert f"size={H}x{LAYERS}" in proc.stdout
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["rows"]
  # The trained workdir encodes too (its tokenizer comes from the converted checkpoint).
  emb = embed_texts(workdir, ["a red cube"])
  assert emb.shape == (1, H) and np.isfinite(emb).all()
  bad = subprocess.run([sys.executable, "-m", "rerank.train", "--config=configs/demo.py:runlocal",
                        f"--workdir={tmp_path / 'wd2'}", f"--config.init_from={tmp_path}"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                       timeout=300)
  assert bad.returncode != 0 and "not a converted checkpoint" in bad.stderr
