"""Tests for rerank.data.synthetic_scenes: determinism, shapes, caption truth, near-identity,
rendered images."""

import dataclasses
import os
import re

import numpy as np
import pytest
from PIL import Image

from rerank import errors
from rerank.data import synthetic_scenes as ss

_TOKEN_RE = re.compile(r"[a-z]+|[^\sa-z]")


@pytest.fixture(scope="module")
def scenes():
  return ss.generate("test", num_images=40)


def _cells(s, row):  # grid cell of each valid region, read from the box centre
  k = s.num_regions[row]
  centre = (s.boxes[row, :k, :2] + s.boxes[row, :k, 2:4]) / 2
  return (np.floor(centre[:, 1] * 3) * 3 + np.floor(centre[:, 0] * 3)).astype(int)


def test_determinism_and_seed_dependence():
  a = ss.generate("dev", seed=3, num_images=24)
  b = ss.generate("dev", seed=3, num_images=24)
  c = ss.generate("dev", seed=4, num_images=24)
  assert a.captions == b.captions
  np.testing.assert_array_equal(a.attributes, b.attributes)
  np.testing.assert_array_equal(a.boxes, b.boxes)
  fa, ma = a.region_features(np.arange(24))
  fb, mb = b.region_features(np.arange(24))
  np.testing.assert_array_equal(fa, fb)
  np.testing.assert_array_equal(ma, mb)
  assert a.captions != c.captions
  assert not np.array_equal(a.attributes, c.attributes)
  assert not np.array_equal(fa, c.region_features(np.arange(24))[0])
  # noise depends on the image, not on the batch it is requested in
  alone, _ = a.region_features([7])
  mixed, _ = a.region_features(np.array([9, 7, 7]))
  np.testing.assert_array_equal(alone[0], fa[7])
  np.testing.assert_array_equal(mixed[1], fa[7])
  np.testing.assert_array_equal(mixed[2], fa[7])


def test_splits_have_distinct_ids_and_content():
  parts = [ss.generate(split, num_images=8) for split in ss.SPLIT_SIZES]
  ids = np.concatenate([p.image_ids for p in parts])
  assert len(np.unique(ids)) == 24
  assert parts[0].image_ids[0] == 0 and parts[2].image_ids[0] == 20_000_000
  assert parts[0].captions != parts[2].captions


def test_sizes_round_up_to_whole_families():
  assert ss.generate("test", num_images=41).num_images == 44
  dev = ss.generate("dev")
  assert dev.num_images == 1016 and dev.num_texts == 5080  # 1014 -> 254 families of 4
  assert ss.generate("test", num_images=10, family_size=3).num_images == 12


def test_shapes_dtypes_and_masks(scenes):
  n = 40
  assert (scenes.num_images, scenes.num_texts) == (n, n * ss.CAPTIONS_PER_IMAGE)
  assert scenes.image_ids.dtype == np.int64 and scenes.image_ids.shape == (n,)
  assert scenes.attributes.dtype == np.int32 and scenes.attributes.shape == (n, 4, 4)
  assert scenes.boxes.dtype == np.float32 and scenes.boxes.shape == (n, 4, 6)
  assert scenes.num_regions.dtype == np.int32
  assert scenes.num_regions.min() >= 2 and scenes.num_regions.max() <= ss.MAX_REGIONS
  np.testing.assert_array_equal(scenes.caption_image, np.repeat(np.arange(n), 5))
  assert scenes.caption_image.dtype == np.int32
  feats, mask = scenes.region_features(np.arange(n))
  assert feats.shape == (n, ss.MAX_REGIONS, ss.REGION_DIM) == (n, 4, 2054)
  assert feats.dtype == np.float32 and mask.dtype == bool
  np.testing.assert_array_equal(mask.sum(1), scenes.num_regions)
  np.testing.assert_array_equal(mask, scenes.attributes[..., 0] >= 0)
  np.testing.assert_array_equal(feats[..., ss.FEATURE_DIM:], scenes.boxes)
  assert np.all(feats[~mask] == 0) and np.all(scenes.boxes[~mask] == 0)
  assert np.all(scenes.attributes[~mask] == -1)
  for col, values in enumerate(ss.ATTRIBUTES):
    present = scenes.attributes[mask][:, col]
    assert 0 <= present.min() <= present.max() < len(values)


def test_boxes_are_valid_and_show_size_and_cell(scenes):
  mask = scenes.attributes[..., 0] >= 0
  b = scenes.boxes[mask]  # [regions, 6]
  assert b.min() >= 0 and b.max() <= 1
  assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
  np.testing.assert_allclose(b[:, 4], b[:, 2] - b[:, 0], atol=1e-6)
  np.testing.assert_allclose(b[:, 5], b[:, 3] - b[:, 1], atol=1e-6)
  np.testing.assert_allclose(b[:, 0] * ss.IMAGE_W, np.round(b[:, 0] * ss.IMAGE_W), atol=1e-3)
  size = scenes.attributes[mask][:, 3]
  assert b[size == 2, 4].min() > b[size == 0, 4].max()  # large boxes always wider than small
  for row in range(scenes.num_images):  # one object per cell
    assert len(set(_cells(scenes, row))) == scenes.num_regions[row]


def test_features_encode_attributes_under_noise(scenes):
  clean = ss.generate("test", num_images=40, noise_std=0.0)
  noisy, mask = scenes.region_features(np.arange(40))
  pure, _ = clean.region_features(np.arange(40))
  signal, noise = pure[..., :2048][mask], (noisy - pure)[..., :2048][mask]
  assert 0.9 < signal.std() < 1.1  # per-entry scale O(1)
  assert 0.7 < noise.std() / ss.DEFAULT_NOISE_STD < 1.3
  ratio = np.linalg.norm(noise, axis=-1).mean() / np.linalg.norm(signal, axis=-1).mean()
  assert 0.6 < ratio < 0.9
  assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 0.1  # regions get independent noise
  table = ss._detector(ss.DETECTOR_SEED)[0]  # [23, 2048] per-value vectors
  start = 0
  for col, values in enumerate(ss.ATTRIBUTES):  # nearest value vector recovers every attribute
    decoded = (noisy[..., :2048][mask] @ table[start:start + len(values)].T).argmax(-1)
    np.testing.assert_array_equal(decoded, scenes.attributes[mask][:, col])
    start += len(values)


def test_vocabulary_and_tokenizer(scenes):
  vocab = ss.vocabulary()
  assert len(set(vocab)) == len(vocab) and {",", ";", "."} <= set(vocab)
  words = set(_TOKEN_RE.findall(" ".join(scenes.captions)))
  assert words <= set(vocab)
  assert all(c == c.lower() and len(c.split()) <= 40 for c in scenes.captions)
  tok = ss.build_tokenizer()
  assert [tok.token_to_id(t) for t in ss.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  assert tok.get_vocab_size() == 5 + len(vocab)
  assert tok.padding is None and tok.truncation is None
  for caption, enc in zip(scenes.captions, tok.encode_batch(scenes.captions)):
    assert enc.ids[0] == 2 and enc.ids[-1] == 3
    assert 0 not in enc.ids and 1 not in enc.ids
    assert enc.tokens[1:-1] == _TOKEN_RE.findall(caption)
    assert tok.decode(enc.ids) == " ".join(_TOKEN_RE.findall(caption))
  ids = tok.encode("A Red cube, left.").ids
  assert ids == [2] + [tok.token_to_id(w) for w in ["a", "red", "cube", ",", "left", "."]] + [3]
  assert tok.encode("a dog").ids == [2, tok.token_to_id("a"), 1, 3]


def test_parse_caption_values():
  f = ss.parse_caption("there is a small red metal cube to the left of a blue sphere.")
  assert f == ss.Facts(objects=((0, 0, 0, 0), (1, 1, -1, -1)), relations=((0, 1, 0),))
  f = ss.parse_caption("a red cube, an orange glass sphere and a green torus; the cube is above and"
                       " to the left of the sphere and the torus is below the cube.")
  assert f.objects == ((0, 0, -1, -1), (1, 5, 2, -1), (4, 2, -1, -1))
  assert f.relations == ((0, 1, 0), (0, 1, 2), (0, 2, 2))  # torus below cube == cube above torus
  f = ss.parse_caption(
      "a red cube left of a large blue cone, and a red metal cube above the red cube.")
  assert f.relations == ((0, 1, 0), (0, 2, 3))  # "the red cube": the mention with those words


def test_facts_hold_values():
  attributes = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [-1] * 4, [-1] * 4], np.int32)
  boxes = np.zeros((4, 6), np.float32)
  boxes[0, :4] = [0.1, 0.1, 0.2, 0.2]  # top-left cell
  boxes[1, :4] = [0.8, 0.4, 0.9, 0.6]  # middle-right cell
  for text, expected in [("a red cube left of a blue sphere.", True),
                         ("a blue sphere to the right of a small red metal cube.", True),
                         ("a red cube above and to the left of a blue sphere.", True),
                         ("a red cube right of a blue sphere.", False),
                         ("a large red cube.", False),
                         ("a red sphere.", False),
                         ("a red cube left of a red cube.", False)]:  # needs two distinct cubes
    assert ss.facts_hold(ss.parse_caption(text), attributes, boxes) == expected, text


@pytest.mark.parametrize("kwargs", [dict(num_images=40),
                                    dict(num_images=24, family_size=6, min_objects=4,
                                         max_objects=4)])
def test_captions_true_of_own_image_and_false_of_siblings(kwargs):
  s = ss.generate("test", **kwargs)
  fs = s.family_size
  for t, caption in enumerate(s.captions):
    row = s.caption_image[t]
    facts = ss.parse_caption(caption)
    assert 1 <= len(facts.objects) <= 4 and (len(facts.objects) == 1 or facts.relations)
    assert ss.facts_hold(facts, s.attributes[row], s.boxes[row]), caption
    for sib in range(row - row % fs, row - row % fs + fs):
      if sib != row:
        assert not ss.facts_hold(facts, s.attributes[sib], s.boxes[sib]), (caption, sib)


def _images_true_of(s, caption):
  facts = ss.parse_caption(caption)
  return [i for i in range(s.num_images) if ss.facts_hold(facts, s.attributes[i], s.boxes[i])]


def test_eval_captions_have_one_correct_image_in_the_split():
  s = ss.generate("test", num_images=200)
  for t, caption in enumerate(s.captions):
    row = s.caption_image[t]
    for other in set(_images_true_of(s, caption)) - {row}:
      # only when no caption can tell them apart: every object of row's scene is in other's
      mine = s.attributes[row, :s.num_regions[row]].tolist()
      theirs = s.attributes[other, :s.num_regions[other]].tolist()
      assert all(o in theirs for o in mine), (caption, row, other)
  # family-only captions (the train split's default) are often true of other images
  for family_only in (ss.generate("test", num_images=200, unique_captions=False),
                      ss.generate("train", num_images=200)):
    shared = sum(len(_images_true_of(family_only, c)) > 1 for c in family_only.captions)
    assert shared > 50, shared


def test_family_variants_are_near_identical():
  s = ss.generate("test", num_images=80, noise_std=0.0)
  feats, mask = s.region_features(np.arange(80))
  means = feats[..., :ss.FEATURE_DIM].sum(1) / mask.sum(1, keepdims=True)  # [N, 2048]
  colour_swaps = 0
  for base in range(0, 80, 4):
    k = s.num_regions[base]
    assert np.all(s.num_regions[base:base + 4] == k)
    signatures = set()
    for row in range(base, base + 4):
      objs = sorted(zip(_cells(s, row), map(tuple, s.attributes[row, :k].tolist())))
      signatures.add(tuple(objs))
    assert len(signatures) == 4  # members differ as (cell, attributes) sets
    for row in range(base + 1, base + 4):
      a, v = s.attributes[base, :k], s.attributes[row, :k]
      same_columns = all(sorted(a[:, c]) == sorted(v[:, c]) for c in range(4))
      assert np.allclose(means[base], means[row], atol=1e-5) == same_columns
      others = lambda attrs, r: sorted(zip(_cells(s, r), attrs[:, [0, 2, 3]].tolist()))
      if same_columns and others(a, base) == others(v, row):  # only colours moved
        colour_swaps += 1  # identical mean, yet a different scene (signatures differ)
  assert colour_swaps >= 5


def test_unknown_split_and_bad_arguments():
  with pytest.raises(ValueError, match="train, dev, test"):
    ss.generate("val")
  with pytest.raises(ValueError):
    ss.generate("test", num_images=8, max_objects=10)


def test_region_features_build_the_detector_tables_once():
  # What keeps region_features cheap (a gather, no per-call table build); no timing here:
  # speed belongs to benchmarks, not to unit tests on a shared machine.
  s = ss.generate("test", num_images=256)
  rows = np.arange(256)
  first = s.region_features(rows)  # builds the detector tables once
  built = ss._detector.cache_info().misses  # pylint: disable=protected-access
  for _ in range(3):
    again = s.region_features(rows)
    np.testing.assert_array_equal(again[0], first[0])
  assert ss._detector.cache_info().misses == built  # pylint: disable=protected-access



# ---------------------------------------------------------------- rendered images
def _box_pixels(s, row, size):
  """[(x1, y1, x2, y2)] of row's objects on a size x size render, as render_one rounds them."""
  return [(round(b[0] * size), round(b[1] * size), round(b[2] * size), round(b[3] * size))
          for b in s.boxes[row, :s.num_regions[row]].tolist()]


def test_render_is_deterministic_per_seed_and_image(scenes):
  images = ss.render(scenes, np.arange(8), 48)
  assert images.shape == (8, 48, 48, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, ss.render(scenes, np.arange(8), 48))
  # an image does not depend on the batch it is rendered in
  np.testing.assert_array_equal(ss.render(scenes, [5, 3, 5])[[0, 2]],
                                ss.render(scenes, [5, 5]))
  np.testing.assert_array_equal(ss.render(scenes, [3], 48)[0], images[3])
  # same scenes under another seed: same objects, other pixel noise
  other = dataclasses.replace(scenes, seed=scenes.seed + 1)
  diff = np.abs(ss.render(other, [3], 48)[0].astype(int) - images[3])
  assert 0 < diff.max() <= 6 * ss.PIXEL_NOISE
  assert not np.array_equal(images[0], images[1])


def test_render_draws_each_object_in_its_box_on_the_background(scenes):
  size = 64
  images = ss.render(scenes, np.arange(16), size).astype(np.float32)
  for row in range(16):
    outside = np.ones((size, size), bool)
    for (x1, y1, x2, y2), (shape, colour, material, _) in zip(
        _box_pixels(scenes, row, size), scenes.attributes[row].tolist()):
      outside[y1:y2, x1:x2] = False
      inside = images[row, y1:y2, x1:x2].reshape(-1, 3)
      # the object covers part of its box with (roughly) its colour; glass lets half the
      # background through
      seen = ss.RGB[colour] if ss.MATERIALS[material] != "glass" else (
          0.55 * ss.RGB[colour] + 0.45 * np.array(ss.BACKGROUND))
      near = np.abs(inside - seen).max(-1) < 40
      assert near.mean() > 0.1, (row, ss.SHAPES[shape], ss.COLOURS[colour], ss.MATERIALS[material])
    rest = images[row][outside]  # background and its faint noise only
    np.testing.assert_allclose(rest.mean(0), ss.BACKGROUND, atol=1.0)
    assert rest.std() < 1.5 * ss.PIXEL_NOISE


def test_render_shows_every_attribute():
  # One object, centred, large: changing any one attribute changes the picture.
  box = np.array([[0.3, 0.3, 0.7, 0.7, 0.4, 0.4]], np.float32)
  base = np.array([[0, 0, 1, 2]], np.int32)
  ref = ss.render_one(base, box, 48).astype(int)
  for col, values in enumerate(ss.ATTRIBUTES[:3]):  # size is the box, checked above
    for v in range(len(values)):
      attrs = base.copy()
      attrs[0, col] = v
      changed = np.abs(ss.render_one(attrs, box, 48).astype(int) - ref).max()
      assert (changed > 40) == (v != base[0, col]), (col, values[v])
  small = ss.render_one(base, np.array([[0.4, 0.4, 0.6, 0.6, 0.2, 0.2]], np.float32), 48)
  assert (np.abs(small.astype(int) - 128).max(-1) > 40).sum() < (np.abs(ref - 128).max(-1) > 40).sum()


def test_write_images_writes_pngs_and_keeps_existing_files(tmp_path, scenes):
  folder = tmp_path / "photos"
  paths = ss.write_images(scenes, str(folder), rows=[0, 5], size=32)
  assert [os.path.basename(p) for p in paths] == [ss.image_name(scenes.image_ids[r]) for r in (0, 5)]
  assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in paths)  # no temp files
  for p, pixels in zip(paths, ss.render(scenes, [0, 5], 32)):
    with Image.open(p) as im:
      assert im.format == "PNG"
      np.testing.assert_array_equal(np.asarray(im.convert("RGB")), pixels)
  with pytest.raises(errors.UserError, match="overwrite"):
    ss.write_images(scenes, str(folder), rows=[5, 6], size=32)
  assert len(os.listdir(folder)) == 2  # nothing written when one name is taken
  ss.write_images(scenes, str(folder), rows=[5, 6], size=48, overwrite=True)
  with Image.open(paths[1]) as im:
    assert im.size == (48, 48)
