"""The pixel demo (configs/demo_pixels.py): rendered scenes in, ViLT / BLIP trained and evaluated."""

import json
import os
import sys

import numpy as np
import pytest

from rerank import train
from rerank.data import datasets
from rerank.data import images
from rerank.data import synthetic_scenes
from rerank.training import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402
from configs import demo_pixels  # noqa: E402


@pytest.mark.parametrize("family", ["vilt", "blip"])
def test_runlocal_trains_and_evaluates_from_pixels(tmp_path, family):
  config = demo_pixels.get_config(f"runlocal,family={family}")
  results = train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["family"] == family
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4, 6]  # every 2 steps + dev evals
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  n_img, n_txt = config.dataset.num_test_images, 5 * config.dataset.num_test_images
  assert results["num_images"] == n_img and results["num_texts"] == n_txt
  assert [row["method"] for row in results["rows"]] == ["BE", "CE", "RR"]
  for row in results["rows"]:
    recalls = [row[d][k] for d in ("t2i", "i2t") for k in ("R@1", "R@5", "R@10")]
    assert all(np.isfinite(recalls)) and all(0 <= v <= 100 for v in recalls)
    assert row["mR"] == pytest.approx(np.mean(recalls))
    # R@10 counts the whole 32-image corpus' top 10: never below R@5, never below R@1
    assert row["t2i"]["R@1"] <= row["t2i"]["R@5"] <= row["t2i"]["R@10"]
  be, ce, rr = results["rows"]
  assert be["queries"] == rr["queries"] == {"t2i": n_txt, "i2t": n_img}
  assert ce["queries"] == {"t2i": config.eval.ce_queries_t2i, "i2t": config.eval.ce_queries_i2t}
  assert rr["k"] == config.eval.k


@pytest.mark.parametrize("family", ["vilt", "blip"])
def test_pixel_configs_load_rendered_preprocessed_images(family):
  config = demo_pixels.get_config(f"runlocal,family={family}")
  tok = datasets.get_tokenizer(config)
  data, captions = datasets.load_split(config, "test", tok, num_images=8)
  assert len(captions) == data.num_texts == 40
  pixels, mask = data.region_features(np.array([3, 1, 3]))
  side = demo_pixels.IMAGE_SIZE
  assert pixels.shape == (3, side, side, 3) and pixels.dtype == np.float32
  assert mask.shape == (3, side, side) and mask.all()  # square renders fill the canvas
  np.testing.assert_array_equal(pixels[0], pixels[2])
  # exactly the rendered scene, normalised as the family's image processor does
  scenes = synthetic_scenes.generate("test", num_images=8, noise_std=config.dataset.noise_std)
  want, _ = images.preprocess_array(synthetic_scenes.render(scenes, [1], side),
                                    images.ImageSpec.from_dict(config.image))
  np.testing.assert_array_equal(pixels[1], want[0])
  spec = images.ImageSpec.from_dict(config.image)
  np.testing.assert_allclose(pixels[1, 0, 0], (np.array(synthetic_scenes.BACKGROUND) / 255
                                               - spec.mean) / spec.std, atol=0.1)
  # region configs keep their region features
  region_data, _ = datasets.load_split(demo.get_config("runlocal"), "test", tok, num_images=8)
  regions, region_mask = region_data.region_features(np.array([1]))
  assert regions.shape == (1, 4, synthetic_scenes.REGION_DIM) and region_mask.shape == (1, 4)


def _set(config, **fields):
  with config.unlocked():
    for field, value in fields.items():
      node = config
      *parents, leaf = field.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


@pytest.mark.parametrize("arg", ["runlocal", "runlocal,family=blip", "family=blip",
                                 "runlocal,mode=ce", "runlocal,family=blip,mode=be"])
def test_pixel_demo_variants_validate(arg):
  assert validate.problems(demo_pixels.get_config(arg), num_devices=2) == []
  assert validate.problems(demo_pixels.get_config(arg).to_dict(), num_devices=2) == []  # plain dict


@pytest.mark.parametrize("family, fields, says", [
    ("vilt", {"model.family": "vit"}, "config.model.family: expected one of ['regions', 'vilt'"),
    ("vilt", {"image.kind": "blip"}, "config.image.kind: expected 'vilt'"),
    ("vilt", {"image.mean": [0.5, 0.5]}, "config.image.mean: expected 3"),
    ("vilt", {"image.size": 32, "image.max_size": 32},
     "config.image: expected preprocessing onto the model's 48 x 48 image input"),
    ("blip", {"image.size": 64}, "config.image: expected preprocessing onto the model's 48 x 48"),
    ("vilt", {"model.pooling": "max"}, "config.model.pooling: expected one of mean, cls"),
    ("blip", {"model.hidden_size": 33}, "config.model.hidden_size (33) must be a multiple"),
    ("blip", {"max_text_len": 64}, "config.max_text_len: expected at most the model's 32 text"),
])
def test_bad_pixel_configs_name_the_field(family, fields, says):
  found = validate.problems(_set(demo_pixels.get_config(f"runlocal,family={family}"), **fields))
  assert len(found) == 1 and found[0].startswith(says), found


def test_a_missing_image_block_is_reported():
  config = demo_pixels.get_config("runlocal")
  with config.unlocked():
    del config["image"]
  assert validate.problems(config) == [
      "config.image: expected the vilt image preprocessing, e.g. dict(kind='vilt', size=384); "
      "found nothing (the field is missing)"]
