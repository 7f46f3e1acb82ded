"""prepare --source=karpathy: a tiny Karpathy-split JSON + image files (each bad-image case) ->
TFDS pixel dataset -> captions, ids, stored bytes and preprocessed pixels read back."""

import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tokenizers
from PIL import Image
from tokenizers import models, pre_tokenizers, processors

from rerank.data import datasets
from rerank.data import images
from rerank.data import prepare
from rerank.data import tfds_builders
from rerank.data.sources import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = dict(kind="vilt", size=32, max_size=53, size_divisor=16)  # canvas 48 x 48


def _pixels(seed, h=32, w=48):
  """Distinct halves (left / right), so a rotation or a mirror shows in the pixels."""
  rng = np.random.default_rng(seed)
  p = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
  p[:, w // 2:] += np.uint8(150)
  return p


def _save(path, im: Image.Image, fmt, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path, fmt, **kw)


def _release(tmp_path):
  """An image directory with COCO-style filepaths and a dataset_coco.json of 6 usable images:
  RGB JPEG and PNG, a CMYK JPEG, a 16-bit grey PNG and an EXIF-rotated JPEG among them."""
  root = tmp_path / "coco"
  _save(root / "val2014" / "a.jpg", Image.fromarray(_pixels(1)), "JPEG", quality=90)
  _save(root / "train2014" / "b.png", Image.fromarray(_pixels(2)), "PNG")
  _save(root / "train2014" / "c.jpg", Image.fromarray(_pixels(3)).convert("CMYK"), "JPEG")
  _save(root / "train2014" / "d.png",
        Image.fromarray((_pixels(4)[..., 0].astype(np.uint16) * 257)), "PNG")  # 16-bit grey
  exif = Image.Exif()
  exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to display"
  _save(root / "val2014" / "e.jpg", Image.fromarray(_pixels(5)), "JPEG", exif=exif.tobytes())
  _save(root / "val2014" / "f.jpg", Image.fromarray(_pixels(6, 40, 24)), "JPEG")
  entries = [("val2014", "a.jpg", 1, "test"), ("train2014", "b.png", 2, "train"),
             ("train2014", "c.jpg", 3, "restval"), ("train2014", "d.png", 4, "train"),
             ("val2014", "e.jpg", 5, "val"), ("val2014", "f.jpg", 6, "val")]
  items = [_item(*e) for e in entries]
  return root, items


def _item(filepath, filename, cocoid, split):
  return {"filepath": filepath, "filename": filename, "cocoid": cocoid, "split": split,
          "imgid": cocoid, "sentences": [{"raw": f"w{cocoid} w0  w1 ", "tokens": []},
                                         {"raw": f"w{cocoid} w2", "tokens": []}]}


def _json(tmp_path, items):
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps({"dataset": "coco", "images": items}))
  return str(path)


def _tokenizer():
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(10)]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tok


def _config(data_dir, family="vilt", spec=SPEC):
  return ml_collections.ConfigDict(dict(
      dataset=dict(name="coco_images", data_dir=str(data_dir)), model=dict(family=family),
      image=dict(spec), max_text_len=8, max_regions=4))


def _left_behind(data_dir):
  return sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []


def test_prepare_converts_and_reads_back(tmp_path):
  root, items = _release(tmp_path)
  data_dir = tmp_path / "data"
  out = prepare.prepare_karpathy("coco_images", _json(tmp_path, items), str(root), str(data_dir))
  assert out["splits"] == {"train": {"images": 3, "captions": 6}, "val": {"images": 2, "captions": 4},
                           "test": {"images": 1, "captions": 2}}
  assert out["restval_in_train"] == 1 and out["skipped"] == {}
  assert out["converted"] == {"CMYK -> RGB": 1, "EXIF orientation 6 applied": 1, "I;16 -> RGB": 1}

  # records: original bytes where nothing was converted, the converted pixels (PNG) otherwise
  src, index = tfds_builders.open_split(str(data_dir), "coco_images", "train", with_index=True)
  assert index["image_ids"] == ["2", "3", "4"]  # JSON order, restval (3) inside train
  assert index["filenames"] == ["train2014/b.png", "train2014/c.jpg", "train2014/d.png"]
  assert index["captions"][0] == ["w2 w0 w1", "w2 w2"]
  assert src[0]["image"] == (root / "train2014" / "b.png").read_bytes()
  cmyk = Image.open(io.BytesIO(src[1]["image"]))
  assert (cmyk.format, cmyk.mode) == ("PNG", "RGB")
  np.testing.assert_array_equal(np.asarray(cmyk), np.asarray(
      Image.open(root / "train2014" / "c.jpg").convert("RGB")))
  grey = np.asarray(Image.open(io.BytesIO(src[2]["image"])))
  np.testing.assert_array_equal(grey[..., 0], _pixels(4)[..., 0])  # v * 257 -> v exactly
  test_src = tfds_builders.open_split(str(data_dir), "coco_images", "test")
  assert test_src[0]["image"] == (root / "val2014" / "a.jpg").read_bytes()

  # the EXIF-rotated JPEG is stored upright: its decoded pixels turned 90 degrees clockwise
  val, val_index = tfds_builders.open_split(str(data_dir), "coco_images", "val", with_index=True)
  sideways = np.asarray(Image.open(root / "val2014" / "e.jpg").convert("RGB"))  # no transpose
  upright = np.asarray(Image.open(io.BytesIO(val[0]["image"])))
  np.testing.assert_array_equal(upright, np.rot90(sideways, k=-1))
  assert list(val[0]["image_size"]) == [32, 48]  # (width, height): 48 x 32 turned
  assert upright[:24].mean() < 100 < upright[24:].mean()  # the bright half is now at the bottom

  # load_split: dev -> val, pixels preprocessed per batch, files named
  data, captions = datasets.load_split(_config(data_dir), "dev", _tokenizer())
  assert captions == ["w5 w0 w1", "w5 w2", "w6 w0 w1", "w6 w2"]
  assert list(data.image_ids) == [5, 6] and list(data.caption_image) == [0, 0, 1, 1]
  assert data.region_features.filenames == ["val2014/e.jpg", "val2014/f.jpg"]
  got, mask = data.region_features(np.array([1, 0, 1]))
  spec = images.ImageSpec.from_dict(SPEC)
  want, want_mask = images.preprocess([Image.fromarray(upright),
                                       Image.open(root / "val2014" / "f.jpg")], spec)
  assert got.shape == (3, 48, 48, 3) and got.dtype == np.float32 and mask.dtype == bool
  np.testing.assert_array_equal(got, want[[1, 0, 1]])
  np.testing.assert_array_equal(mask, want_mask[[1, 0, 1]])
  assert mask[0].sum() == 48 * 32 and mask[1].sum() == 32 * 48  # portrait and landscape
  again, _ = data.region_features(np.array([0]))  # from the reader's cache of the last call
  np.testing.assert_array_equal(again, want[:1])
  # BLIP's square input from the same dataset
  blip = dict(kind="blip", size=40)
  data, _ = datasets.load_split(_config(data_dir, "blip", blip), "test", _tokenizer())
  got, mask = data.region_features(np.array([0]))
  want, _ = images.preprocess([Image.open(root / "val2014" / "a.jpg")],
                              images.ImageSpec.from_dict(blip))
  np.testing.assert_array_equal(got, want)
  assert mask.all() and got.shape == (1, 40, 40, 3)


def _bad_cases(root):
  """name -> (item, skipped kind, message); the huge one needs images.MAX_PIXELS lowered."""
  good = (root / "val2014" / "a.jpg").read_bytes()
  (root / "val2014" / "cut.jpg").write_bytes(good[:len(good) // 2])
  (root / "val2014" / "text.jpg").write_bytes(b"not an image at all")
  _save(root / "val2014" / "big.jpg", Image.fromarray(np.zeros((64, 64, 3), np.uint8)), "JPEG")
  return {"truncated": (_item("val2014", "cut.jpg", 11, "val"), "bad_image", "cannot be decoded"),
          "unreadable": (_item("val2014", "text.jpg", 12, "val"), "bad_image",
                         "not an image file"),
          "huge": (_item("val2014", "big.jpg", 13, "test"), "huge_image",
                   "expected at most 3000 pixels; found 64 x 64"),
          "missing": (_item("val2014", "gone.jpg", 14, "train"), "missing_image", "no such file")}


@pytest.mark.parametrize("case", ["truncated", "unreadable", "huge", "missing"])
def test_bad_image_stops_naming_file_and_id(tmp_path, monkeypatch, case):
  monkeypatch.setattr(images, "MAX_PIXELS", 3000)  # the 32 x 48 good images pass, 64 x 64 not
  root, items = _release(tmp_path)
  item, _, message = _bad_cases(root)[case]
  data_dir = tmp_path / "data"
  path = root / item["filepath"] / item["filename"]
  with pytest.raises(common.BadInput) as e:
    prepare.prepare_karpathy("coco_images", _json(tmp_path, items + [item]), str(root),
                             str(data_dir))
  assert str(e.value).startswith(f"{path} (image id {item['cocoid']}): ") and message in str(e.value)
  assert _left_behind(data_dir) == []


def test_skip_bad_counts_every_case(tmp_path, monkeypatch):
  monkeypatch.setattr(images, "MAX_PIXELS", 3000)
  root, items = _release(tmp_path)
  bad = [item for item, _, _ in _bad_cases(root).values()]
  malformed = dict(_item("val2014", "a.jpg", 20, "val"), sentences="w1 w2")
  duplicate = _item("train2014", "b.png", 21, "test")  # b.png is listed as image 2 already
  path = _json(tmp_path, items + bad + [malformed, duplicate])
  data_dir = tmp_path / "data"
  with pytest.raises(common.BadInput, match=r"images\[10\] \(image id 20\): \"sentences\""):
    prepare.prepare_karpathy("coco_images", path, str(root), str(data_dir))
  out = prepare.prepare_karpathy("coco_images", path, str(root), str(data_dir), skip_bad=True)
  assert out["skipped"] == {"bad_image": 2, "duplicate_id": 1, "huge_image": 1,
                            "malformed_row": 1, "missing_image": 1}
  assert {s: c["images"] for s, c in out["splits"].items()} == {"train": 3, "val": 2, "test": 1}
  with pytest.raises(FileExistsError, match="--overwrite"):
    prepare.prepare_karpathy("coco_images", path, str(root), str(data_dir), skip_bad=True)
  assert _left_behind(data_dir) == ["coco_images"]


def test_cli_one_error_line_then_skip_bad_summary(tmp_path):
  root, items = _release(tmp_path)
  item = _bad_cases(root)["truncated"][0]
  data_dir = tmp_path / "data"
  cmd = [sys.executable, "-m", "rerank.data.prepare", "--source=karpathy", "--dataset=coco_images",
         f"--karpathy_json={_json(tmp_path, items + [item])}", f"--source_dir={root}",
         f"--data_dir={data_dir}"]
  env = dict(os.environ, PYTHONPATH=REPO)
  bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  lines = bad.stderr.strip().splitlines()
  assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
  assert lines[-1].startswith(f"error: {root / 'val2014' / 'cut.jpg'} (image id 11): cannot be "
                              "decoded") and "--skip_bad" in lines[-1]
  assert _left_behind(data_dir) == []
  ok = subprocess.run(cmd + ["--skip_bad"], capture_output=True, text=True, env=env, cwd=REPO)
  assert ok.returncode == 0, ok.stderr
  summary = json.loads(ok.stdout)
  assert summary["skipped"] == {"bad_image": 1} and summary["splits"]["val"]["images"] == 2


def test_splits_without_images(tmp_path):
  root, items = _release(tmp_path)
  data_dir = tmp_path / "data"
  only_test = _json(tmp_path, [items[0]])
  out = prepare.prepare_karpathy("coco_images", only_test, str(root), str(data_dir))
  assert list(out["splits"]) == ["test"]  # by default, the splits the file has
  with pytest.raises(ValueError, match=r"expected images in split\(s\) \['train'\]"):
    prepare.prepare_karpathy("coco_images", only_test, str(root), str(data_dir), splits=["train"],
                             overwrite=True)
  item = _bad_cases(root)["truncated"][0]
  with pytest.raises(ValueError, match=r"split 'val': every image was skipped .*'bad_image': 1"):
    prepare.prepare_karpathy("coco_images", _json(tmp_path, [items[0], item]), str(root),
                             str(data_dir), skip_bad=True, overwrite=True)
  assert _left_behind(data_dir) == ["coco_images"]  # the first dataset, untouched
  assert tfds_builders.open_split(str(data_dir), "coco_images", "test")[0]["image"] == (
      root / "val2014" / "a.jpg").read_bytes()
