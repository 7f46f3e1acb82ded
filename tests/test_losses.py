"""Checks the BE/CE losses against slow double-loop NumPy references written from the formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rerank.training import losses

SEEDS = (0, 1, 2, 3)


def _batch(seed, b=8, d=16, n_images=4):
  """Non-unit embeddings with repeated image ids, so same-image masking changes the answer."""
  rng = np.random.default_rng(seed)
  txt = (rng.normal(size=(b, d)) * rng.uniform(0.5, 3.0, size=(b, 1))).astype(np.float32)
  img = (rng.normal(size=(b, d)) * rng.uniform(0.5, 3.0, size=(b, 1))).astype(np.float32)
  ids = rng.integers(0, n_images, size=b).astype(np.int32)
  ids[1] = ids[0]  # guarantee at least one shared image
  return txt, img, ids


def _cos_loop(txt, img):
  b = len(txt)
  out = np.zeros((b, b))
  for t in range(b):
    for i in range(b):
      a, v = txt[t].astype(np.float64), img[i].astype(np.float64)
      out[t, i] = a @ v / (np.linalg.norm(a) * np.linalg.norm(v))
  return out


def _vsepp_ref(txt, img, txt_ids, img_ids, margin):
  dist = 1.0 - _cos_loop(txt, img)
  b = len(txt)
  total = 0.0
  for i in range(b):
    neg_img = [dist[i, j] for j in range(b) if img_ids[j] != txt_ids[i]]
    if neg_img:
      total += max(0.0, dist[i, i] - min(neg_img) + margin)
    neg_txt = [dist[k, i] for k in range(b) if txt_ids[k] != img_ids[i]]
    if neg_txt:
      total += max(0.0, dist[i, i] - min(neg_txt) + margin)
  return total / b


def _infonce_ref(txt, img, txt_ids, img_ids, temperature):
  logits = _cos_loop(txt, img) / temperature
  b = len(txt)
  t2i, i2t = 0.0, 0.0
  for i in range(b):
    row = [logits[i, j] for j in range(b) if j == i or img_ids[j] != txt_ids[i]]
    t2i += -logits[i, i] + math.log(sum(math.exp(x) for x in row))
    col = [logits[k, i] for k in range(b) if k == i or txt_ids[k] != img_ids[i]]
    i2t += -logits[i, i] + math.log(sum(math.exp(x) for x in col))
  return 0.5 * (t2i / b + i2t / b)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("margin", (0.1, 0.5))
def test_vsepp_matches_loop_reference(seed, margin):
  txt, img, ids = _batch(seed)
  got = losses.vsepp_triplet_loss(txt, img, ids, ids, margin=margin)
  want = _vsepp_ref(txt, img, ids, ids, margin)
  assert want > 0  # random embeddings: the hinge must be active, or the test proves little
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_vsepp_masking_changes_value():
  # Row 1's caption describes image 0; treating it as a negative would change the loss.
  txt, img, ids = _batch(0)
  masked = float(losses.vsepp_triplet_loss(txt, img, ids, ids, margin=0.5))
  unmasked_ids = np.arange(len(ids), dtype=np.int32)
  unmasked = float(losses.vsepp_triplet_loss(txt, img, unmasked_ids, unmasked_ids, margin=0.5))
  np.testing.assert_allclose(unmasked, _vsepp_ref(txt, img, unmasked_ids, unmasked_ids, 0.5),
                             rtol=1e-5)
  assert abs(masked - unmasked) > 1e-4


def test_vsepp_distinct_txt_and_img_ids():
  # Caption ids and image-row ids may differ; each direction must use the right one.
  txt, img, _ = _batch(5)
  txt_ids = np.array([0, 0, 1, 2, 2, 3, 4, 5], np.int32)
  img_ids = np.array([0, 1, 1, 2, 3, 3, 4, 6], np.int32)
  got = losses.vsepp_triplet_loss(txt, img, txt_ids, img_ids, margin=0.3)
  np.testing.assert_allclose(float(got), _vsepp_ref(txt, img, txt_ids, img_ids, 0.3), rtol=1e-5)


def test_vsepp_no_negatives_is_zero():
  txt, img, _ = _batch(1)
  ids = np.full(len(txt), 7, np.int32)
  loss, grads = jax.value_and_grad(losses.vsepp_triplet_loss, argnums=(0, 1))(
      txt, img, ids, ids, 0.5)
  assert float(loss) == 0.0
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_vsepp_hand_case():
  # Unit 2-D vectors: text0 = image0 = e1, text1 = image1 = e2 -> d_ii = 0, negatives at d = 1.
  e = np.eye(2, dtype=np.float32)
  ids = np.array([0, 1], np.int32)
  # Each of 2 rows: relu(0 - 1 + 1.5) twice = 1.0 per row.
  np.testing.assert_allclose(float(losses.vsepp_triplet_loss(e, 3 * e, ids, ids, 1.5)), 1.0,
                             rtol=1e-6)
  assert float(losses.vsepp_triplet_loss(e, e, ids, ids, 0.5)) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_vsepp_gradient_finite(seed):
  txt, img, ids = _batch(seed)
  txt[2] = 0.0  # an all-zero embedding must not produce NaNs through the normalisation
  grads = jax.grad(losses.vsepp_triplet_loss, argnums=(0, 1))(txt, img, ids, ids, 0.5)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert any(np.abs(np.asarray(g)).sum() > 0 for g in grads)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", (0.05, 1.0))
def test_infonce_matches_loop_reference(seed, temperature):
  txt, img, ids = _batch(seed)
  got = losses.infonce_loss(txt, img, ids, ids, temperature=temperature)
  want = _infonce_ref(txt, img, ids, ids, temperature)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def test_infonce_single_image_batch_and_grad():
  # Every off-diagonal entry is masked: each softmax has one entry, so the loss is exactly 0.
  txt, img, _ = _batch(2)
  ids = np.zeros(len(txt), np.int32)
  loss, grads = jax.value_and_grad(losses.infonce_loss, argnums=(0, 1))(txt, img, ids, ids)
  np.testing.assert_allclose(float(loss), 0.0, atol=1e-6)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


def test_losses_bf16_inputs_use_f32_math():
  txt, img, ids = _batch(3)
  txt16, img16 = jnp.asarray(txt, jnp.bfloat16), jnp.asarray(img, jnp.bfloat16)
  # Reference on the bf16-rounded values: any gap left is the loss's own precision.
  txt_r, img_r = np.asarray(txt16, np.float32), np.asarray(img16, np.float32)
  got = losses.infonce_loss(txt16, img16, ids, ids)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), _infonce_ref(txt_r, img_r, ids, ids, 0.05), rtol=1e-5)
  got = losses.vsepp_triplet_loss(txt16, img16, ids, ids, 0.5)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), _vsepp_ref(txt_r, img_r, ids, ids, 0.5), rtol=1e-5)


def test_cross_entropy_hand_computation():
  logits = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, 3.0]], np.float32)
  labels = np.array([0, 1, 0], np.int32)
  # -log softmax: log(1+e^-2), log 2, log(1+e^4) (true class 0 has logit -1, other 3).
  want = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(4))) / 3
  np.testing.assert_allclose(float(losses.cross_entropy_loss(logits, labels)), want, rtol=1e-6)


def test_pair_accuracy_hand_computation():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 3.0], [5.0, 4.0]], np.float32)
  labels = np.array([0, 1, 0, 1], np.int32)
  np.testing.assert_allclose(float(losses.pair_accuracy(logits, labels)), 0.5)


def test_jit_matches_eager():
  txt, img, ids = _batch(4)
  logits = np.random.default_rng(4).normal(size=(10, 2)).astype(np.float32)
  labels = (np.arange(10) % 2).astype(np.int32)
  for name, fn in losses.BE_LOSSES.items():
    eager = float(fn(txt, img, ids, ids))
    jitted = float(jax.jit(fn)(txt, img, ids, ids))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, err_msg=name)
  for fn in (losses.cross_entropy_loss, losses.pair_accuracy):
    np.testing.assert_allclose(float(jax.jit(fn)(logits, labels)), float(fn(logits, labels)),
                               rtol=1e-6)


def test_registry():
  assert losses.BE_LOSSES == {"vsepp": losses.vsepp_triplet_loss,
                              "infonce": losses.infonce_loss}


def test_listwise_loss_matches_numpy_softmax_reference():
  scores = np.random.default_rng(3).normal(size=(6, 5)).astype(np.float32)
  ref = -np.mean([s[0] - np.log(np.exp(s).sum()) for s in scores.astype(np.float64)])
  np.testing.assert_allclose(float(losses.listwise_loss(jnp.asarray(scores))), ref, rtol=1e-5)
  # the loss falls as the positive (column 0) gains on the others
  better = scores.copy()
  better[:, 0] += 1.0
  assert float(losses.listwise_loss(jnp.asarray(better))) < float(losses.listwise_loss(scores))


def test_sampled_triplet_matches_loop_reference():
  rng = np.random.default_rng(5)
  t, p, n = (rng.normal(size=s).astype(np.float32) for s in [(4, 6), (4, 6), (4, 3, 6)])
  cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
  ref = np.mean([max(0.0, cos(t[i], n[i, j]) - cos(t[i], p[i]) + 0.2)
                 for i in range(4) for j in range(3)])
  got = losses.sampled_triplet_loss(jnp.asarray(t), jnp.asarray(p), jnp.asarray(n), margin=0.2)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  # negatives far from every caption give zero loss
  assert float(losses.sampled_triplet_loss(jnp.asarray(t), jnp.asarray(t),
                                           -jnp.asarray(t)[:, None], margin=0.2)) == 0.0
