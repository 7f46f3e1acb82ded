"""Search a folder of photos: `rerank.index --images=DIR` then `rerank.search` (issue 17).

A folder of small drawn scenes (a coloured shape each, in assorted formats and sub-folders,
plus files that cannot be read) and a tiny ViLT trained for a few seconds on them until it
tells them apart: the index skips and reports the unreadable files, and a caption of one photo
finds that photo's file, by the bi-encoder and after cross-encoder reranking. BLIP's cached
image states give the same reranking scores as recomputing them from the files.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageDraw
import pytest

from rerank import errors
from rerank import index as index_cli
from rerank.data import datasets
from rerank.data import image_folder
from rerank.data import images as images_lib
from rerank.data import synthetic_scenes
from rerank.evaluation import pixel_costs
from rerank.inference import retriever
from rerank.models import pretrained
from rerank.models import pixels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 32  # pixels: every photo is SIDE x SIDE

# (file under the folder, caption, colour, shape): formats, case and depth vary on purpose.
PHOTOS = [
    ("kitchen/red_cube.png", "a red cube", (220, 30, 30), "square"),
    ("kitchen/Blue_Sphere.JPG", "a blue sphere", (30, 60, 220), "circle"),
    ("garden/deep/green_pyramid.png", "a green pyramid", (30, 180, 40), "triangle"),
    ("yellow_sphere.PNG", "a yellow sphere", (230, 210, 30), "circle"),
    ("purple_pyramid.bmp", "a purple pyramid", (140, 40, 170), "triangle"),
    ("white_cube.webp", "a white cube", (250, 250, 250), "square"),
]
UNREADABLE = ["broken.jpg", "garden/truncated.png"]
IGNORED = ["notes.txt", ".thumbs/red_cube.png"]  # not an image extension; a hidden folder


def _draw(colour, shape) -> Image.Image:
  im = Image.new("RGB", (SIDE, SIDE), (90, 90, 90))
  d, a, b = ImageDraw.Draw(im), 5, SIDE - 6
  if shape == "square":
    d.rectangle([a, a, b, b], fill=colour)
  elif shape == "circle":
    d.ellipse([a, a, b, b], fill=colour)
  else:
    d.polygon([(SIDE // 2, a), (a, b), (b, b)], fill=colour)
  return im


def _write_photos(root) -> None:
  for rel, _, colour, shape in PHOTOS + [(IGNORED[1], "", (220, 30, 30), "square")]:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _draw(colour, shape).save(path, quality=95)  # the format from the extension
  with open(os.path.join(root, UNREADABLE[0]), "wb") as f:
    f.write(b"this is not a JPEG")
  png = os.path.join(root, "kitchen", "red_cube.png")
  with open(png, "rb") as f, open(os.path.join(root, UNREADABLE[1]), "wb") as g:
    g.write(f.read()[:60])  # the header survives, the pixels do not
  with open(os.path.join(root, IGNORED[0]), "w") as f:
    f.write("shopping list\n")


def _tiny_model(family: str):
  """(module, Config, ImageSpec dict) of a tiny model of `family` on SIDE x SIDE photos."""
  lib = pixels.module(family)
  if family == "vilt":
    cfg = lib.Config(vocab_size=len(synthetic_scenes.vocabulary()) + 5, hidden_size=32,
                     num_layers=2, num_heads=2, mlp_dim=64, max_position_embeddings=16,
                     image_size=SIDE, patch_size=8, max_image_height=SIDE, max_image_width=SIDE)
    spec = images_lib.ImageSpec("vilt", size=SIDE, max_size=SIDE, size_divisor=8)
  else:
    cfg = lib.Config.from_dict(dict(BLIP_FIELDS, vocab_size=len(synthetic_scenes.vocabulary()) + 5))
    spec = images_lib.ImageSpec("blip", size=SIDE, mean=images_lib.CLIP_MEAN, std=images_lib.CLIP_STD)
  return lib, cfg, spec


# A tiny BLIP: the field names are rerank/models/blip.py's Config.
BLIP_FIELDS = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                   max_position_embeddings=16, vision_hidden_size=32, vision_num_layers=2,
                   vision_num_heads=2, vision_mlp_dim=64, image_size=SIDE, patch_size=8,
                   image_text_hidden_size=16)


def _train(model, params, tok, ids, mask, ims, ims_mask, steps: int):
  """A few Adam steps of BE contrastive + CE match losses over every (caption, photo) pair."""
  ids, mask, ims, ims_mask = map(jnp.asarray, (ids, mask, ims, ims_mask))  # jit constants
  n = len(ids)
  ti, ii = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  ti, ii = ti.reshape(-1), ii.reshape(-1)
  match = (ti == ii).astype(np.int32)  # [n * n]
  weight = np.where(match, n - 1, 1).astype(np.float32)  # as many positives as negatives

  def loss_fn(p):
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    t = unit(model.apply({"params": p}, ids, mask, method=model.embed_text))
    i = unit(model.apply({"params": p}, ims, ims_mask, method=model.embed_image))
    sim = t @ i.T / 0.1
    be = (optax.softmax_cross_entropy_with_integer_labels(sim, jnp.arange(n)).mean()
          + optax.softmax_cross_entropy_with_integer_labels(sim.T, jnp.arange(n)).mean())
    logits = model.apply({"params": p}, ids[ti], mask[ti], ims[ii], ims_mask[ii],
                         method=model.score_pairs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, match)
    return be + (ce * weight).sum() / weight.sum()

  tx = optax.adam(5e-3)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    grads = jax.grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  for _ in range(steps):
    params, state = step(params, state)
  return params


def _checkpoint(tmp, family: str, steps: int) -> str:
  """A converted checkpoint (model.json + params/ + tokenizer/) of a tiny `family` model,
  trained `steps` steps on the photos (0: random weights)."""
  lib, cfg, spec = _tiny_model(family)
  tok = synthetic_scenes.build_tokenizer()
  model = lib.Model(cfg, head_dropout=0.0)
  ids, mask = datasets.tokenize(tok, [c for _, c, _, _ in PHOTOS], 8)
  ims, ims_mask = images_lib.preprocess([_draw(c, s) for _, _, c, s in PHOTOS], spec)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), ids, mask, ims, ims_mask)["params"])
  if steps:
    params = _train(model, params, tok, ids, mask, ims, ims_mask, steps)
  elif "itm_head" in params:  # untrained: a head of std 1 (not 0.02) spreads the scores apart
    kernel = params["itm_head"]["kernel"]
    params["itm_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
  dst = os.path.join(tmp, f"{family}_conv")
  meta = {"family": family, "model": dataclasses.asdict(cfg), "image": spec.to_dict(),
          "cls_token_id": tok.token_to_id("[CLS]"), "has_ce_head": True, "source": "test"}
  pretrained.write_converted(dst, meta, jax.tree_util.tree_map(np.asarray, params), tok)
  return dst


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("photos"))
  _write_photos(root)
  return root


@pytest.fixture(scope="module")
def vilt(tmp_path_factory):
  return _checkpoint(str(tmp_path_factory.mktemp("vilt")), "vilt", steps=150)


def _quiet(*args, **kwargs):
  del args, kwargs


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


# ------------------------------------------------------------------ the folder


def test_list_images_recursive_sorted_case_insensitive(photos):
  files = image_folder.list_images(photos)
  assert files == sorted([p for p, *_ in PHOTOS] + UNREADABLE)
  with pytest.raises(errors.UserError, match="--images .*expected a directory of images"):
    image_folder.list_images(os.path.join(photos, "notes.txt"))


# ------------------------------------------------------------------ index + search, ViLT


@pytest.fixture(scope="module")
def vilt_index(photos, vilt, tmp_path_factory):
  """The command line's index of the photos (skipping the unreadable files)."""
  out = str(tmp_path_factory.mktemp("idx") / "photos_index")
  proc = _run("rerank.index", f"--checkpoint={vilt}", f"--images={photos}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  return out, proc.stdout + proc.stderr


def test_index_skips_and_reports_unreadable_files(vilt_index, photos):
  out, log = vilt_index
  assert f"skipped 2 unreadable file(s) of {len(PHOTOS) + 2}" in log
  for name in UNREADABLE:
    assert name in log
  with open(os.path.join(out, "skipped.tsv"), encoding="utf-8") as f:
    assert [line.split("\t")[0] for line in f.read().splitlines()[1:]] == sorted(UNREADABLE)
  with open(os.path.join(out, "index.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["identity"]["images"] == os.path.abspath(photos)
  assert meta["identity"]["skipped"] == 2 and meta["identity"]["image_cache"] is None  # ViLT
  assert "skipped.tsv" in meta["files"] and "image_files.npy" in meta["files"]
  files = np.load(os.path.join(out, "image_files.npy"))
  assert files.tolist() == sorted(p for p, *_ in PHOTOS)


def test_search_returns_the_captioned_file(vilt_index, photos):
  r = retriever.Retriever.load(vilt_index[0])
  captions = [c for _, c, _, _ in PHOTOS]
  for rerank in (False, True):
    hits = r.search(captions, k=4, rerank=rerank)
    assert [h[0]["file"] for h in hits] == [p for p, *_ in PHOTOS], rerank
    for (rel, *_), h in zip(PHOTOS, hits):
      assert h[0]["path"] == os.path.join(photos, *rel.split("/"))
      assert np.isfinite(h[0]["ce_score"]) == rerank
  # Reranked: the CE orders the 4 candidates, and the caption's photo wins it.
  ce = [[x["ce_score"] for x in h] for h in r.search(captions, k=4, rerank=True)]
  assert all(row == sorted(row, reverse=True) for row in ce)


def test_a_moved_folder_is_read_where_it_is_now(vilt_index, photos, tmp_path):
  moved = tmp_path / "moved"
  shutil.copytree(photos, moved)
  r = retriever.Retriever.load(vilt_index[0], images_dir=str(moved))
  hit = r.search("a green pyramid", k=3, rerank=True)[0][0]
  assert hit["path"] == str(moved / "garden" / "deep" / "green_pyramid.png")
  with pytest.raises(errors.UserError, match="images_dir .*the folder of photos"):
    retriever.Retriever.load(vilt_index[0], images_dir=str(tmp_path / "nowhere"))


def test_search_command_prints_the_file(vilt_index):
  proc = _run("rerank.search", f"--index={vilt_index[0]}", "--query=a purple pyramid",
              "--rerank", "--k=3", "--show=3")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  first = lines[lines.index(next(x for x in lines if x.lstrip().startswith("rank"))) + 1].split()
  assert first[0] == "1" and first[-1] == "purple_pyramid.bmp"


def test_folder_index_keeps_the_index_guarantees(vilt, photos, tmp_path):
  out = tmp_path / "idx"
  out.mkdir()
  (out / "notes.md").write_text("mine")
  with pytest.raises(errors.UserError, match="an empty directory or an index"):
    index_cli.build_folder_index(vilt, photos, str(out), log=_quiet)
  assert (out / "notes.md").read_text() == "mine"
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  (empty / "sub" / "readme.txt").write_text("no photos")
  with pytest.raises(errors.UserError, match="expected image files"):
    index_cli.build_folder_index(vilt, str(empty), str(tmp_path / "idx2"), log=_quiet)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "a.png").write_bytes(b"nope")
  with pytest.raises(errors.UserError, match="at least one readable image.*a.png"):
    index_cli.build_folder_index(vilt, str(bad), str(tmp_path / "idx3"), log=_quiet)
  assert not (tmp_path / "idx3").exists()
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no scratch left


# ------------------------------------------------------------------ BLIP's cached image states


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
  # Random weights: what is checked is that the cache changes no score, not what it finds.
  return _checkpoint(str(tmp_path_factory.mktemp("blip")), "blip", steps=0)


def test_blip_cached_states_rerank_as_recomputing(blip, photos, tmp_path):
  mine = str(tmp_path / "photos")
  shutil.copytree(photos, mine)  # this test damages its photos at the end
  out = str(tmp_path / "idx")
  index_cli.build_folder_index(blip, mine, out, cache_dtype="float32", log=_quiet)
  states = np.load(os.path.join(out, "image_states.npy"))
  assert states.dtype == np.float32 and states.shape == (len(PHOTOS), (SIDE // 8) ** 2 + 1, 32)
  cached = retriever.Retriever.load(out)
  fresh = retriever.Retriever.load(out, use_image_cache=False)
  assert cached.image_states is not None and fresh.image_states is None
  captions = [c for _, c, _, _ in PHOTOS]
  a, b = (r.search(captions, k=len(PHOTOS), rerank=True) for r in (cached, fresh))
  ce_a = np.array([[h["ce_score"] for h in q] for q in a])
  ce_b = np.array([[h["ce_score"] for h in q] for q in b])
  assert [[h["file"] for h in q] for q in a] == [[h["file"] for h in q] for q in b]
  np.testing.assert_allclose(ce_a, ce_b, atol=1e-5, rtol=0)
  assert ce_a.std() > 1e-2  # the scores differ between pairs: the comparison can fail
  # The BE embeddings indexed from the states equal the model's own image embeddings.
  idx_emb = np.load(os.path.join(out, "embeddings.npy"))
  np.testing.assert_allclose(idx_emb, fresh.encode_images(np.arange(len(PHOTOS))), atol=1e-5)

  # float16 states: half the bytes, scores within the storage's precision. The rebuild
  # replaces the index only with overwrite.
  with pytest.raises(errors.UserError, match="an index already; pass --overwrite"):
    index_cli.build_folder_index(blip, mine, out, cache_dtype="float16", log=_quiet)
  index_cli.build_folder_index(blip, mine, out, cache_dtype="float16", overwrite=True, log=_quiet)
  assert np.load(os.path.join(out, "image_states.npy")).dtype == np.float16
  half = retriever.Retriever.load(out).search(captions, k=len(PHOTOS), rerank=True)
  by_file = lambda q: {h["file"]: h["ce_score"] for h in q}  # noqa: E731
  for q16, q32 in zip(half, a):
    s16, s32 = by_file(q16), by_file(q32)
    np.testing.assert_allclose([s16[f] for f in s32], list(s32.values()), atol=2e-2)

  # The cache is what reranking reads: with the photos unreadable, only it still works.
  for rel, *_ in PHOTOS:
    with open(os.path.join(mine, *rel.split("/")), "wb") as f:
      f.write(b"gone")
  again = cached.search(captions, k=len(PHOTOS), rerank=True)
  np.testing.assert_array_equal([[h["ce_score"] for h in q] for q in again], ce_a)
  with pytest.raises(errors.UserError, match="readable when the index was built"):
    fresh.search(captions, k=len(PHOTOS), rerank=True)


def test_pixel_bench_times_ce_k_with_and_without_the_cache():
  rows = pixel_costs.measure(("blip", "vilt"), "tiny", k=3, log=_quiet)
  blip_row, vilt_row = rows
  for r in rows:
    assert r["ce_k_pixels"] > 0 and r["ce_k_files"] > 0 and r["index_seconds_per_image"] > 0
  assert "ce_k_cached" not in vilt_row  # ViLT: nothing to cache
  assert blip_row["ce_k_cached"] > 0
  assert blip_row["cache_bytes_per_image"] == ((64 // 16) ** 2 + 1) * 64 * 2  # [P+1, Dv] float16
  assert blip_row["cache_max_abs_diff_float32"] < 1e-5
  assert blip_row["cache_max_abs_diff_float16"] < 1e-2
  table = pixel_costs.markdown(rows)
  assert "| blip | tiny |" in table and "nothing to cache" in table
