"""Encoder and heads: padding invariance, input orders, logical axis names, dtype option."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rerank.models import encoder as encoder_lib
from rerank.models import heads

V, T, R, F = 50, 7, 3, 2054


def _model(**kw):
  cfg = encoder_lib.EncoderConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                                  max_position_embeddings=32, **kw)
  return heads.RetrievalModel(cfg, cls_token_id=2)


def _inputs(seed=0, b=3):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, V, (b, T)).astype(np.int32)
  ids[:, 0] = 2
  lengths = np.array([T, 4, 2])[:b]
  tmask = np.arange(T)[None] < lengths[:, None]
  regions = rng.normal(size=(b, R, F)).astype(np.float32)
  nreg = np.array([R, 1, 2])[:b]
  rmask = np.arange(R)[None] < nreg[:, None]
  return ids, tmask, regions, rmask


def _outputs(model, params, ids, tmask, regions, rmask):
  apply = lambda m, *a: model.apply({"params": params}, *a, method=m)  # noqa: E731
  return (np.asarray(apply(model.embed_text, ids, tmask)),
          np.asarray(apply(model.embed_image, regions, rmask)),
          np.asarray(apply(model.score_pairs, ids, tmask, regions, rmask)))


@pytest.mark.parametrize("visual,order", [("oscar", "text_first"), ("m3p", "image_first"),
                                          ("uniter", "text_first")])
def test_padding_does_not_change_outputs(visual, order):
  model = _model(visual=visual, order=order)
  ids, tmask, regions, rmask = _inputs()
  params = nn.unbox(model.init(jax.random.key(0), ids, tmask, regions, rmask)["params"])
  base = _outputs(model, params, ids, tmask, regions, rmask)
  # Extra padding positions with garbage contents: more text columns and more region slots.
  rng = np.random.default_rng(1)
  pad_ids = np.concatenate([np.where(tmask, ids, rng.integers(5, V, ids.shape)),
                            rng.integers(5, V, (3, 4))], axis=1).astype(np.int32)
  pad_tmask = np.concatenate([tmask, np.zeros((3, 4), bool)], axis=1)
  pad_regions = np.concatenate([np.where(rmask[..., None], regions, 7.0), rng.normal(size=(3, 2, F))],
                               axis=1).astype(np.float32)
  pad_rmask = np.concatenate([rmask, np.zeros((3, 2), bool)], axis=1)
  padded = _outputs(model, params, pad_ids, pad_tmask, pad_regions, pad_rmask)
  for a, b in zip(base, padded):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_single_example_matches_batch():
  model = _model()
  ids, tmask, regions, rmask = _inputs()
  params = nn.unbox(model.init(jax.random.key(0), ids, tmask, regions, rmask)["params"])
  full = _outputs(model, params, ids, tmask, regions, rmask)
  n = int(tmask[1].sum())
  one = _outputs(model, params, ids[1:2, :n], tmask[1:2, :n], regions[1:2, :1], rmask[1:2, :1])
  for a, b in zip(full, one):
    np.testing.assert_allclose(a[1:2], b, atol=1e-5, rtol=1e-5)


def test_embeddings_are_masked_means_and_scores_depend_on_both_inputs():
  model = _model()
  ids, tmask, regions, rmask = _inputs()
  params = nn.unbox(model.init(jax.random.key(0), ids, tmask, regions, rmask)["params"])
  hidden, mask, _ = model.apply({"params": params}, ids, tmask, method=lambda m, a, b: m.encoder(a, b))
  want = [np.asarray(hidden)[i][np.asarray(mask)[i]].mean(0) for i in range(3)]
  got = model.apply({"params": params}, ids, tmask, method=model.embed_text)
  np.testing.assert_allclose(np.asarray(got), np.stack(want), atol=1e-5)
  s1 = model.apply({"params": params}, ids, tmask, regions, rmask, method=model.score_pairs)
  s2 = model.apply({"params": params}, ids, tmask, regions[::-1], rmask[::-1], method=model.score_pairs)
  assert s1.shape == (3, 2) and not np.allclose(np.asarray(s1), np.asarray(s2))


def test_every_parameter_has_logical_axes():
  model = _model()
  boxed = model.init(jax.random.key(0), *_inputs())["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == x.value.ndim
  names = {n for x in leaves for n in x.names}
  assert {"vocab", "embed", "heads", "kv", "mlp"} <= names


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
  m32, m16 = _model(), _model(dtype="bfloat16")
  inputs = _inputs()
  params = nn.unbox(m32.init(jax.random.key(0), *inputs)["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
      nn.unbox(m16.init(jax.random.key(0), *inputs)["params"])))
  a = m32.apply({"params": params}, *inputs[:2], method=m32.embed_text)
  b = m16.apply({"params": params}, *inputs[:2], method=m16.embed_text)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.1)


def test_bad_config_values_are_named():
  with pytest.raises(ValueError, match="model.visual"):
    encoder_lib.EncoderConfig(vocab_size=5, visual="clip")
  with pytest.raises(ValueError, match="num_heads"):
    encoder_lib.EncoderConfig(vocab_size=5, hidden_size=30, num_heads=4)
