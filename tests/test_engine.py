"""The inference engine: padded, bucketed jitted BE/CE equal the plain model; weights swap without
recompiling; images are read one batch at a time; workdirs restore with their identity."""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

from rerank.data import datasets
from rerank.inference import engine
from rerank.models import build
from rerank.training import checkpoints
from rerank.training import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402


@pytest.fixture(scope="module")
def setup():
  config = demo.get_config("runlocal,mode=joint_alternate")
  tok = datasets.get_tokenizer(config)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  p0, p1 = (build.init_params(model, config, jax.random.PRNGKey(s)) for s in (0, 1))
  data, _ = datasets.load_split(config, "test", tok, 32)
  return config, tok, model, p0, p1, data


def _unit(x):
  x = np.asarray(x)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_engine_equals_the_plain_model_whatever_the_batch(setup):
  config, _, model, p0, _, data = setup
  ids, mask = data.token_ids[:37], data.text_mask[:37]
  regions, region_mask = data.region_features(np.arange(13))
  raw_txt = model.apply({"params": p0}, ids, mask, method=model.embed_text)  # [37, H]
  raw_img = model.apply({"params": p0}, regions, region_mask, method=model.embed_image)
  logits = model.apply({"params": p0}, ids[:13], mask[:13], regions, region_mask,
                       method=model.score_pairs)  # [13, 2]
  for batch in (5, 64):  # a padded last batch, and one batch larger than the input
    eng = engine.Engine(model, config.mode, batch, p0)
    np.testing.assert_allclose(eng.embed_texts(ids, mask), _unit(raw_txt), atol=1e-5)
    np.testing.assert_allclose(eng.embed_images(regions, region_mask), _unit(raw_img), atol=1e-5)
    np.testing.assert_allclose(eng.score_pairs(ids[:13], mask[:13], regions, region_mask),
                               np.asarray(logits)[:, 1], atol=1e-4)
    raw = engine.Engine(model, config.mode, batch, p0, normalize=False)
    np.testing.assert_allclose(raw.embed_texts(ids, mask), raw_txt, atol=1e-5)
  empty = eng.embed_texts(ids[:0], mask[:0])
  assert empty.shape == (0, model.cfg.hidden_size) and empty.dtype == np.float32


def test_set_params_swaps_weights_without_recompiling(setup):
  config, _, model, p0, p1, data = setup
  eng = engine.Engine(model, config.mode, 16, p0)
  first = eng.embed_texts(data.token_ids, data.text_mask)
  compiled = eng._text._cache_size()  # noqa: SLF001
  widths = {engine.trim_text(data.token_ids[a:a + 16], data.text_mask[a:a + 16])[0].shape[1]
            for a in range(0, data.num_texts, 16)}
  assert compiled == len(widths) and all(w % engine.TEXT_BUCKET == 0 for w in widths)
  second = eng.set_params(p1).embed_texts(data.token_ids, data.text_mask)
  assert eng._text._cache_size() == compiled  # noqa: SLF001
  assert not np.allclose(first, second)
  be_only = engine.Engine(model, "be", 16, p0)
  with pytest.raises(ValueError, match="has no CE"):
    be_only.score_pairs(data.token_ids[:2], data.text_mask[:2], *data.region_features(np.arange(2)))


def test_data_scorer_reads_one_batch_of_images_at_a_time(setup):
  config, _, model, p0, _, data = setup
  asked = []

  def region_features(rows):
    asked.append(len(rows))
    return data.region_features(rows)

  logged = dataclasses.replace(data, region_features=region_features)
  scorer = engine.DataScorer(engine.Engine(model, config.mode, 8, p0))
  rows = np.arange(30)[::-1]
  got = scorer.images(logged, rows)
  assert max(asked) <= 8  # never the whole corpus at once
  np.testing.assert_array_equal(got, scorer.images(data, rows))
  pairs = scorer.pairs(logged, np.arange(20), np.arange(20) % 7)
  want = engine.Engine(model, config.mode, 8, p0).score_pairs(
      data.token_ids[:20], data.text_mask[:20], *data.region_features(np.arange(20) % 7))
  np.testing.assert_array_equal(pairs, want)
  assert scorer.images(data, np.arange(0)).shape == (0, model.cfg.hidden_size)


def test_restore_a_workdir_and_refuse_what_is_not_a_checkpoint(setup, tmp_path):
  config, _, model, _, _, _ = setup
  work = str(tmp_path / "wd")
  os.makedirs(work)
  with open(os.path.join(work, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  state = steps.init_train_state(model, config, steps.optimizer(config), jax.random.PRNGKey(2))
  ckpts = checkpoints.Checkpoints(work, async_save=False)
  ckpts.save(4, state)
  ckpts.close()
  m = engine.restore(work)
  assert m.description == "latest (step 4)" and m.mode.name == "joint_alternate"
  assert m.config.mode == config.mode and m.max_text_len == config.max_text_len
  assert m.fingerprint == engine.params_fingerprint(state["params"])
  other = build.init_params(model, config, jax.random.PRNGKey(3))
  assert engine.params_fingerprint(other) != m.fingerprint
  assert m.engine().batch_size == config.eval.batch_size
  with pytest.raises(ValueError, match="neither a converted checkpoint"):
    engine.restore(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json: not found"):
    engine.restore_workdir(str(tmp_path))
  with pytest.raises(ValueError, match=r"expected \[N, R, "):
    m.image_inputs(np.zeros((2, 3, 5), np.float32))
