"""prepare: tiny files in each official format -> TFDS dataset -> exact values read back."""

import base64
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from rerank.data import batches
from rerank.data import datasets
from rerank.data import prepare
from rerank.data import tfds_builders
from rerank.data.sources import common
from rerank.data.sources import flickr30k_butd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _b64(a) -> str:
  return base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()


def _image(rng, key, n):
  """A fake detector output: w, h, pixel boxes [n, 4], features [n, 2048]."""
  w, h = 500 + key % 7, 375 + key % 5
  x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
  boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
  return w, h, boxes.astype(np.float32), rng.normal(size=(n, 2048)).astype(np.float32)


def _tsv_row(key, w, h, boxes, feats):
  return f"{key}\t{w}\t{h}\t{len(boxes)}\t{_b64(boxes)}\t{_b64(feats)}\n"


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _flickr(tmp_path, splits=(("train", [11, 12, 13]), ("val", [21]), ("test", [31, 32]))):
  """flickr30k_entities + BUTD TSV files; returns the expected images by id."""
  src = tmp_path / "flickr"
  rng = np.random.default_rng(0)
  expected, rows = {}, []
  for split, keys in splits:
    _write(str(src / f"{split}.txt"), "".join(f"{k}\n" for k in keys))
    for k in keys:
      w, h, boxes, feats = _image(rng, k, 3 + k % 4)
      rows.append(_tsv_row(k, w, h, boxes, feats))
      caps = [f"[/EN#{k}1/people A man] number {k} [/EN#{k}2/clothing/other in red] .",
              f"caption two of {k}", f"a third [/EN#9/scene  field ] for {k}"]
      _write(str(src / "Sentences" / f"{k}.txt"), "\n".join(caps) + "\n")
      expected[str(k)] = dict(split=split, w=w, h=h, boxes=boxes, feats=feats, captions=[
          f"A man number {k} in red .", f"caption two of {k}", f"a third field for {k}"])
  rows.append(_tsv_row(99, *_image(rng, 99, 2)))  # an image in no split list is ignored
  _write(str(src / "feats.tsv.0"), "".join(rows[:3]))
  _write(str(src / "feats.tsv.1"), "".join(rows[3:]))
  return src, expected


def _expected_regions(e):
  w, h = e["w"], e["h"]
  b = e["boxes"].astype(np.float64) / [w, h, w, h]
  six = np.concatenate([b, b[:, 2:3] - b[:, :1], b[:, 3:4] - b[:, 1:2]], 1)
  return np.concatenate([e["feats"], six.astype(np.float32)], 1)


def _read_all(data_dir, name, split):
  src = tfds_builders.open_split(str(data_dir), name, split)
  return [src[i] for i in range(len(src))]


def test_strip_entities_markup():
  assert flickr30k_butd.strip_markup(
      "[/EN#18/people A man] with [/EN#19/bodyparts/other pierced ears] .") == (
          "A man with pierced ears .")
  assert flickr30k_butd.strip_markup("no markup [here]") == "no markup [here]"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_flickr30k_butd_exact_read_back(tmp_path, dtype):
  src, expected = _flickr(tmp_path)
  out = prepare.prepare("flickr30k_butd", str(src), str(tmp_path / "data"), dtype=dtype)
  assert out["splits"] == {"train": {"images": 3, "captions": 9}, "val": {"images": 1, "captions": 3},
                           "test": {"images": 2, "captions": 6}}
  assert out["skipped"] == {}
  for split, keys in (("train", ["11", "12", "13"]), ("val", ["21"]), ("test", ["31", "32"])):
    got = _read_all(tmp_path / "data", "flickr30k_butd", split)
    assert [g["image_id"].decode() for g in got] == keys  # split-list order
    for g in got:
      e = expected[g["image_id"].decode()]
      assert g["regions"].dtype == np.dtype(dtype)
      np.testing.assert_array_equal(g["regions"], _expected_regions(e).astype(dtype))
      np.testing.assert_array_equal(g["boxes"], e["boxes"] / np.float32([e["w"], e["h"]] * 2))
      np.testing.assert_array_equal(g["image_size"], [e["w"], e["h"]])
      assert [c.decode() for c in g["captions"]] == e["captions"]
      assert [c.decode() for c in g["languages"]] == ["en"] * 3
    # the caption index (metadata.json) agrees with the records
    _, index = tfds_builders.open_split(str(tmp_path / "data"), "flickr30k_butd", split,
                                        with_index=True)
    assert index["image_ids"] == keys
    assert index["captions"] == [[c.decode() for c in g["captions"]] for g in got]


def _bad_flickr(tmp_path, kind):
  """A flickr30k source with one bad item of `kind` (in train, image 12)."""
  src, _ = _flickr(tmp_path)
  tsv = src / "feats.tsv.0"
  lines = tsv.read_text().splitlines(keepends=True)
  rng = np.random.default_rng(5)
  w, h, boxes, feats = _image(rng, 12, 4)
  if kind == "malformed_row":
    lines[1] = "12\t500\t375\t4\tnot-base64!\tAAAA\n"
  elif kind == "bad_width":
    lines[1] = _tsv_row(12, w, h, boxes, feats[:, :2000])
  elif kind == "non_finite":
    feats[2, 7] = np.nan
    lines[1] = _tsv_row(12, w, h, boxes, feats)
  elif kind == "duplicate_id":
    lines.append(lines[0])  # image 11 twice
  elif kind == "caption_without_image":
    del lines[1]
  elif kind == "image_without_captions":
    os.remove(src / "Sentences" / "12.txt")
  elif kind == "empty_caption":
    _write(str(src / "Sentences" / "12.txt"), "a fine caption\n   \nanother\n")
  tsv.write_text("".join(lines))
  return src


@pytest.mark.parametrize("kind,where,reason", [
    ("malformed_row", "feats.tsv.0:2", "base64"),
    ("bad_width", "feats.tsv.0:2", "expected num_boxes*2048 = 8192 float32 values; found 8000"),
    ("non_finite", "feats.tsv.0:2", "region 2 value 7 is nan"),
    ("duplicate_id", "feats.tsv.0:4", "image id 11 already has a feature row"),
    ("caption_without_image", "image id 12", "no feature row"),
    ("image_without_captions", "image id 12", "12.txt"),
    ("empty_caption", "12.txt", "caption 1 is empty"),
])
def test_bad_input_stops_with_location_or_is_skipped_and_counted(tmp_path, kind, where, reason):
  src = _bad_flickr(tmp_path, kind)
  data_dir = tmp_path / "data"
  with pytest.raises(common.BadInput) as e:
    prepare.prepare("flickr30k_butd", str(src), str(data_dir))
  assert e.value.kind == kind and where in str(e.value) and reason in str(e.value), str(e.value)
  assert not os.path.exists(data_dir)  # a failed prepare leaves nothing behind

  out = prepare.prepare("flickr30k_butd", str(src), str(data_dir), skip_bad=True)
  assert out["skipped"] == {kind: 1}
  train = [g["image_id"].decode() for g in _read_all(data_dir, "flickr30k_butd", "train")]
  if kind in ("duplicate_id", "empty_caption"):  # the first row is kept / the caption dropped
    assert train == ["11", "12", "13"]
    assert out["splits"]["train"]["captions"] == 9 - (kind == "empty_caption")
  else:
    assert train == ["11", "13"]


def test_an_image_in_two_splits_is_a_duplicate(tmp_path):
  src, _ = _flickr(tmp_path)
  _write(str(src / "test.txt"), "31\n12\n32\n")  # 12 is a train image
  with pytest.raises(common.BadInput, match="image id 12: is in split 'train' and in split 'test'"):
    prepare.prepare("flickr30k_butd", str(src), str(tmp_path / "data"))
  out = prepare.prepare("flickr30k_butd", str(src), str(tmp_path / "data"), skip_bad=True)
  assert out["skipped"] == {"duplicate_id": 1} and out["splits"]["test"]["images"] == 2


def test_cli_prints_one_json_line_and_one_error_line(tmp_path):
  src, _ = _flickr(tmp_path)
  cmd = [sys.executable, "-m", "rerank.data.prepare", "--dataset=flickr30k_butd",
         f"--source_dir={src}", f"--data_dir={tmp_path / 'data'}", "--dtype=float32"]
  env = dict(os.environ, PYTHONPATH=REPO)
  ok = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert ok.returncode == 0, ok.stderr
  lines = ok.stdout.strip().splitlines()
  assert len(lines) == 1
  summary = json.loads(lines[0])
  assert summary["dataset"] == "flickr30k_butd"
  assert summary["splits"]["test"] == {"images": 2, "captions": 6}

  _write(str(src / "Sentences" / "31.txt"), "a caption\n\nlast\n")
  bad = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
  assert bad.returncode != 0 and bad.stdout == ""
  assert "31.txt: caption 1 is empty" in bad.stderr and "--skip_bad" in bad.stderr
  # the old dataset is untouched by the failed --overwrite
  assert len(_read_all(tmp_path / "data", "flickr30k_butd", "test")) == 2


def test_multi30k_languages_and_per_language_split(tmp_path):
  src, expected = _flickr(tmp_path, splits=(("train", [11, 12]), ("val", [21]), ("test", [31])))
  m = tmp_path / "multi30k"
  for split, keys in (("train", [12, 11]), ("val", [21]), ("test_2016", [31])):
    _write(str(m / "image_splits" / (f"{split}_flickr.txt" if split == "test_2016" else
                                    f"{split}.txt")), "".join(f"{k}.jpg\n" for k in keys))
    for lang in ("en", "de"):
      for c in range(1, 6):
        _write(str(m / f"{split}.{c}.{lang}"), "".join(f"{lang}{c} {k}\n" for k in keys))
    for lang in ("fr", "cs"):
      name = "test_2016_flickr" if split == "test_2016" else split
      _write(str(m / f"{name}.{lang}"), "".join(f"{lang} {k}\n" for k in keys))
  out = prepare.prepare("multi30k", str(m), str(tmp_path / "data"), dtype="float32",
                        features=str(src / "feats.tsv.*"))
  assert out["splits"]["train"] == {"images": 2, "captions": 24}
  assert out["splits"]["test_2016"] == {"images": 1, "captions": 12}
  got = _read_all(tmp_path / "data", "multi30k", "train")
  assert [g["image_id"].decode() for g in got] == ["12", "11"]
  g = got[0]
  np.testing.assert_array_equal(g["regions"], _expected_regions(expected["12"]))
  assert [c.decode() for c in g["captions"]] == (
      [f"en{c} 12" for c in range(1, 6)] + [f"de{c} 12" for c in range(1, 6)] + ["fr 12", "cs 12"])
  assert [x.decode() for x in g["languages"]] == ["en"] * 5 + ["de"] * 5 + ["fr", "cs"]

  cfg = _config("multi30k", tmp_path / "data", language="fr")
  data, caps = datasets.load_split(cfg, "dev", _word_tokenizer(), None)  # dev -> val
  assert caps == ["fr 21"] and data.num_images == 1 and data.image_ids.tolist() == [21]

  # a caption file one line short names the file and both counts
  _write(str(m / "val.cs"), "")
  with pytest.raises(common.BadInput, match=r"val\.cs: expected one caption per image .* \(1 lines\); found 0"):
    prepare.prepare("multi30k", str(m), str(tmp_path / "data2"), features=str(src / "feats.tsv.*"))


def test_cc_dev_npz(tmp_path):
  src = tmp_path / "cc"
  rng = np.random.default_rng(1)
  expected = {}
  for key in ("b_img", "a_img"):
    w, h, boxes, feats = _image(rng, 3, 5)
    np.savez(src / f"{key}.npz" if src.exists() else (os.makedirs(src) or src / f"{key}.npz"),
             x=feats, bbox=boxes, num_bbox=5, image_h=h, image_w=w)
    expected[key] = dict(w=w, h=h, boxes=boxes, feats=feats)
  _write(str(src / "captions.tsv"), "a_img\tfirst caption\nb_img\tsecond  caption\n")
  out = prepare.prepare("cc_dev", str(src), str(tmp_path / "data"), dtype="float32")
  assert out["splits"] == {"dev": {"images": 2, "captions": 2}}
  got = _read_all(tmp_path / "data", "cc_dev", "dev")
  assert [g["image_id"].decode() for g in got] == ["a_img", "b_img"]
  np.testing.assert_array_equal(got[1]["regions"], _expected_regions(expected["b_img"]))
  assert [c.decode() for c in got[1]["captions"]] == ["second caption"]


def _config(name, data_dir, max_regions=4, max_text_len=12, **extra):
  return ml_collections.ConfigDict(dict(
      dataset=dict(name=name, data_dir=str(data_dir), **extra), max_regions=max_regions,
      max_text_len=max_text_len))


def _word_tokenizer():
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(10)]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tok


def test_prepared_synthetic_scenes_matches_the_generated_split(tmp_path):
  out = prepare.prepare("synthetic_scenes", "", str(tmp_path / "data"), dtype="float32",
                        splits=["test"], num_images=12)
  assert out["splits"] == {"test": {"images": 12, "captions": 60}}
  gen_cfg = ml_collections.ConfigDict(dict(
      dataset=dict(name="synthetic_scenes", seed=0, family_size=4, noise_std=0.75),
      max_regions=4, max_text_len=40))
  tok = datasets.get_tokenizer(gen_cfg)
  want, want_caps = datasets.load_split(gen_cfg, "test", tok, 12)
  got, got_caps = datasets.load_split(_config("synthetic_scenes", tmp_path / "data",
                                              max_text_len=40), "test", tok, None)
  assert got_caps == want_caps
  np.testing.assert_array_equal(got.token_ids, want.token_ids)
  np.testing.assert_array_equal(got.caption_image, want.caption_image)
  np.testing.assert_array_equal(got.image_ids, want.image_ids)
  rows = np.array([3, 0, 3, 11])
  for a, b in zip(got.region_features(rows), want.region_features(rows)):
    np.testing.assert_array_equal(a, b)
  # truncation to the configured regions keeps the first ones in stored order
  short, _ = datasets.load_split(_config("synthetic_scenes", tmp_path / "data", max_regions=2,
                                         max_text_len=40), "test", tok, 5)
  assert short.num_images == 5
  np.testing.assert_array_equal(short.region_features(rows[:2])[0],
                                want.region_features(rows[:2])[0][:, :2])


def test_trainer_input_from_a_prepared_split_is_truncated_to_the_config(tmp_path):
  # The trainer's path: load_split, then train_batch(lazy=True) read per device slice; on one
  # device the whole batch, which must equal the eager batch.
  prepare.prepare("synthetic_scenes", "", str(tmp_path / "data"), dtype="float16",
                  splits=["train"], num_images=24)
  cfg = _config("synthetic_scenes", tmp_path / "data", max_regions=3, max_text_len=16)
  data, _ = datasets.load_split(cfg, "train", datasets.get_tokenizer(cfg))
  for step in range(3):
    lazy = batches.train_batch(data, ("be", "ce"), 16, 3, step, lazy=True)
    eager = batches.train_batch(data, ("be", "ce"), 16, 3, step)
    for part in ("be", "ce"):
      for key, value in eager[part].items():
        np.testing.assert_array_equal(np.asarray(lazy[part][key]), value, err_msg=f"{part}/{key}")
  assert eager["be"]["regions"].shape == (16, 3, 2054)  # config.max_regions
  assert eager["be"]["token_ids"].shape == (16, 16)  # config.max_text_len
  assert eager["ce"]["regions"].shape == (32, 3, 2054)


def _coco_files(src, torch):
  rng = np.random.default_rng(2)
  ids = {"train": [5, 6, 7], "minival": [8], "test": [9, 10, 1, 2]}
  expected = {}
  for split, keys in ids.items():
    _write(str(src / f"{split}_img_keys.tsv"), "".join(f"{k}\n" for k in keys))
    caps, feats = {}, {}
    for k in keys:
      regions = rng.normal(size=(2 + k % 3, 2054)).astype(np.float32)
      feats[k] = torch.from_numpy(regions)
      # OSCAR stores some caption lists as JSON strings
      caps[k] = json.dumps([f"cap {k} a", f"cap {k} b"]) if k % 2 else [f"cap {k} a", f"cap {k} b"]
      expected[str(k)] = (regions, [f"cap {k} a", f"cap {k} b"])
    torch.save(caps, src / f"{split}_captions.pt")
    torch.save(feats, src / f"{split}_img_frcnn_feats.pt")
  _write(str(src / "test_img_keys_1k.tsv"), "10\n2\n")
  return expected


def _torch_or_skip():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    if os.environ.get("RERANK_REQUIRE_OPTIONAL"):
      raise
    pytest.skip("torch (optional extra) not installed; RERANK_REQUIRE_OPTIONAL unset")
  return torch


def test_coco_oscar_exact_read_back_and_test1k(tmp_path):
  torch = _torch_or_skip()
  src = tmp_path / "coco"
  os.makedirs(src)
  expected = _coco_files(src, torch)
  out = prepare.prepare("coco_oscar", str(src), str(tmp_path / "data"), dtype="float32")
  assert out["splits"] == {"train": {"images": 3, "captions": 6}, "minival": {"images": 1, "captions": 2},
                           "test": {"images": 4, "captions": 8}, "test1k": {"images": 2, "captions": 4}}
  for split, keys in (("train", ["5", "6", "7"]), ("test", ["9", "10", "1", "2"]), ("test1k", ["10", "2"])):
    got = _read_all(tmp_path / "data", "coco_oscar", split)
    assert [g["image_id"].decode() for g in got] == keys
    for g in got:
      regions, caps = expected[g["image_id"].decode()]
      np.testing.assert_array_equal(g["regions"], regions)
      np.testing.assert_array_equal(g["boxes"], regions[:, 2048:2052])
      assert [c.decode() for c in g["captions"]] == caps

  # wrong width and a NaN in one image: stop naming file and id, or skip and count
  feats = torch.load(src / "train_img_frcnn_feats.pt", weights_only=True)
  feats[6] = torch.zeros(3, 2050)
  feats[7][0, 0] = float("inf")
  torch.save(feats, src / "train_img_frcnn_feats.pt")
  with pytest.raises(common.BadInput, match=r"train_img_frcnn_feats.pt: image id 6: region "
                     r"features: expected shape \[N, 2054\].*found \[3, 2050\]"):
    prepare.prepare("coco_oscar", str(src), str(tmp_path / "data2"))
  assert not os.path.exists(tmp_path / "data2" / "coco_oscar")
  out = prepare.prepare("coco_oscar", str(src), str(tmp_path / "data2"), skip_bad=True,
                        splits=["train"])
  assert out["skipped"] == {"bad_width": 1, "non_finite": 1}
  assert out["splits"] == {"train": {"images": 1, "captions": 2}}


def test_coco_oscar_refuses_pickled_objects(tmp_path):
  torch = _torch_or_skip()
  src = tmp_path / "coco"
  os.makedirs(src)
  _coco_files(src, torch)
  torch.save({5: ["a"], 6: ["b"], 7: ["c"], "x": ml_collections.ConfigDict()},
             src / "train_captions.pt")  # an arbitrary pickled object: weights_only refuses it
  with pytest.raises(common.BadInput, match="train_captions.pt: not a readable torch file"):
    prepare.prepare("coco_oscar", str(src), str(tmp_path / "data"), splits=["train"])
