"""rerank.export: a trained workdir's encoder as a converted checkpoint that init_from and encode read."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rerank.models import build

from rerank.training import checkpoints
from rerank import export
from rerank.inference import engine
from rerank.training import steps
from rerank.data import datasets
from rerank.models import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402


def _workdir(path, mode, seed=5, best_step=None):
  """A runlocal workdir of `mode` with random parameters at step 3 (and optionally a best)."""
  config = demo.get_config(f"runlocal,mode={mode}")
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  tok = datasets.get_tokenizer(config)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  init = jax.jit(functools.partial(steps.init_train_state, model, config, steps.optimizer(config)))
  state, other = init(jax.random.PRNGKey(seed)), init(jax.random.PRNGKey(seed + 1))
  ckpts = checkpoints.Checkpoints(path, async_save=False)
  ckpts.save(3, state)
  if best_step is not None:
    ckpts.save_best(best_step, other["params"], 1.0)
  ckpts.wait()
  ckpts.close()
  return config, model, tok, state, other


def _assert_same_tree(got, want):
  flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  pairs = jax.tree_util.tree_flatten_with_path(want)[0]
  assert len(flat) == len(pairs)
  for path, leaf in pairs:
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(leaf))


def test_export_writes_the_encoder_that_init_from_and_encode_read(tmp_path):
  config, model, tok, state, best = _workdir(str(tmp_path / "wd"), "joint_alternate", best_step=2)
  dst = str(tmp_path / "out")
  meta = export.export(str(tmp_path / "wd"), dst, "last", log=lambda *_: None)
  assert meta["family"] == "rerank" and meta["checkpoint"] == "latest (step 3)"
  assert pretrained.is_converted(dst) and pretrained.read_meta(dst) == json.loads(json.dumps(meta))
  _assert_same_tree(pretrained.load_encoder_params(dst), state["params"]["encoder"])
  assert datasets.load_tokenizer(dst).get_vocab() == tok.get_vocab()
  # The default picks the best checkpoint, whose parameters differ from the newest.
  export.export(str(tmp_path / "wd"), str(tmp_path / "best"), log=lambda *_: None)
  _assert_same_tree(pretrained.load_encoder_params(str(tmp_path / "best")), best["params"]["encoder"])
  # init_from builds the same architecture from it, and encode embeds with it as the model did.
  again = demo.get_config("runlocal")
  again.init_from = dst
  rebuilt = build.build_model(again, 0, 0)
  assert rebuilt.cfg == model.cfg and rebuilt.cls_token_id == model.cls_token_id
  texts = ["a red cube", "a small blue sphere left of a green torus"]
  ids, mask = datasets.tokenize(tok, texts, config.max_text_len)
  want = model.apply({"params": state["params"]}, ids, mask, method=model.embed_text)
  m = engine.restore(dst)
  got = m.engine(normalize=False).embed_texts(*m.text_inputs(texts))
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_export_of_a_separate_run_picks_the_part(tmp_path):
  _, _, _, state, _ = _workdir(str(tmp_path / "wd"), "separate")
  for part in ("be", "ce"):
    export.export(str(tmp_path / "wd"), str(tmp_path / part), "last", part, log=lambda *_: None)
    _assert_same_tree(pretrained.load_encoder_params(str(tmp_path / part)), state["params"][part]["encoder"])
  with pytest.raises(ValueError, match="--part"):
    export.export(str(tmp_path / "wd"), str(tmp_path / "x"), "last", "both")


def test_export_cli_errors(tmp_path):
  _workdir(str(tmp_path / "wd"), "be")
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "f").write_text("x")
  env = {**os.environ, "PYTHONPATH": REPO}
  run = lambda *a: subprocess.run([sys.executable, "-m", "rerank.export", *a],  # noqa: E731
                                  capture_output=True, text=True, cwd=REPO, env=env, timeout=480)
  taken = run(f"--workdir={tmp_path / 'wd'}", f"--dst={tmp_path / 'taken'}")
  assert taken.returncode != 0 and "already exists" in taken.stderr
  missing = run(f"--workdir={tmp_path / 'nowhere'}", f"--dst={tmp_path / 'o'}")
  assert missing.returncode != 0 and "config.json: not found" in missing.stderr
  assert not (tmp_path / "o").exists()
  ok = run(f"--workdir={tmp_path / 'wd'}", f"--dst={tmp_path / 'o'}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "exported the encoder" in ok.stdout and pretrained.is_converted(str(tmp_path / "o"))


def test_the_demo_starts_from_the_shipped_pretrained_checkpoint():
  config = demo.get_config()
  assert config.init_from == demo.PRETRAINED and pretrained.is_converted(config.init_from)
  meta = pretrained.read_meta(config.init_from)
  assert meta["family"] == "rerank" and meta["mode"] == "joint_alternate"
  # Its tokenizer is synthetic_scenes' own, and its encoder fits the model the demo builds.
  scenes_tok = datasets.TOKENIZERS["synthetic_scenes"]()
  assert datasets.get_tokenizer(config).get_vocab() == scenes_tok.get_vocab()
  model = build.build_model(config, 0, 0)
  assert model.cls_token_id == scenes_tok.token_to_id("[CLS]")
  state = jax.eval_shape(functools.partial(steps.init_train_state, model, config, steps.optimizer(config)),
                         jax.random.PRNGKey(0))
  params = build.with_pretrained_encoder(state["params"], pretrained.load_encoder_params(config.init_from), config.mode)
  assert np.isfinite(np.asarray(params["encoder"]["pooler"]["kernel"])).all()
  # From random weights: `scratch`, `runlocal`, `pretrain` (which made it) and other sizes.
  for arg in ("scratch", "runlocal", "pretrain", "size=small"):
    assert demo.get_config(arg).init_from == ""
  assert demo.get_config("pretrain").dataset.seed != config.dataset.seed
