"""prepare with careless inputs and interruptions: one clear error line, nothing left behind.

Each probe builds a tiny release in the test, breaks one thing, and runs the command as a user
would (`python -m rerank.data.prepare`): exit code 2, the file and id in the one `error:` line,
no traceback, no dataset and no temporary directory left. Where the item is skippable,
`--skip_bad` drops and counts it instead.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rerank.data import prepare
from rerank.data import prepared
from rerank.data import tfds_builders
from rerank.data.sources import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def _b64(a) -> str:
  return base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()


def _row(key, n=3, w=500, h=400, seed=0) -> str:
  """One bottom-up-attention TSV row with `n` regions."""
  rng = np.random.default_rng(seed)
  boxes = np.tile(np.float32([1, 2, 30, 40]), (n, 1))
  return f"{key}\t{w}\t{h}\t{n}\t{_b64(boxes)}\t{_b64(rng.normal(size=(n, 2048)))}\n"


def _write(path, text, mode="w"):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, mode) as f:
    f.write(text)


def _flickr(root, splits=(("train", ["11", "12"]), ("val", ["21"]), ("test", ["31"])), rows=None):
  """A minimal flickr30k_butd release under root/src; returns its path."""
  src = root / "src"
  keys = [k for _, ks in splits for k in ks]
  for split, ks in splits:
    _write(src / f"{split}.txt", "".join(f"{k}\n" for k in ks))
  for k in keys:
    _write(src / "Sentences" / f"{k}.txt", f"a caption of {k}\nanother one of {k}\n")
  _write(src / "feats.tsv", "".join(rows if rows is not None else [_row(k) for k in keys]))
  return src


def _prepare(name, src, data, *flags):
  return subprocess.run([sys.executable, "-m", "rerank.data.prepare", f"--dataset={name}",
                         f"--source_dir={src}", f"--data_dir={data}", *flags],
                        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)


def _assert_one_error(res, *words, skippable=True):
  """Exit 2, one `error:` line holding `words`, no traceback, nothing on stdout."""
  assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
  errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
  for w in words:
    assert w in errors[0], (w, errors[0])
  assert ("--skip_bad" in errors[0]) == skippable, errors[0]
  assert res.stdout == ""
  return errors[0]


def _assert_nothing_left(data):
  left = os.listdir(data) if os.path.exists(data) else []
  assert left == [], left


def _skipped(res) -> dict:
  assert res.returncode == 0, res.stderr[-2000:]
  return json.loads(res.stdout)


# ---- ids that collide once read as numbers ----------------------------------------------


def test_ids_12_and_012_in_one_list_are_one_image(tmp_path):
  src = _flickr(tmp_path, splits=(("train", ["12", "012"]), ("val", ["21"]), ("test", ["31"])))
  data = tmp_path / "data"
  line = _assert_one_error(_prepare("flickr30k_butd", src, data), "train.txt:2", "'12'", "'012'",
                           "one number")
  assert "image id 012 already listed on line 1" in line
  _assert_nothing_left(data)
  out = _skipped(_prepare("flickr30k_butd", src, data, "--skip_bad"))
  assert out["skipped"] == {"duplicate_id": 1} and out["splits"]["train"]["images"] == 1


def test_ids_12_and_012_in_two_splits_are_one_image(tmp_path):
  src = _flickr(tmp_path, splits=(("train", ["11", "12"]), ("val", ["21"]), ("test", ["012"])))
  data = tmp_path / "data"
  _assert_one_error(_prepare("flickr30k_butd", src, data), "image id 012",
                    "image id 12 (split 'train')", "one image")
  _assert_nothing_left(data)


def test_loaded_ids_match_the_prepared_ids_one_to_one(tmp_path):
  # What the probes above protect: training reads all-digit ids as numbers.
  assert prepared.numeric_ids(["12", "7"]).tolist() == [12, 7]
  assert prepared.numeric_ids(["12", "²"]).tolist() == [0, 1]  # not int(): no crash, rows
  assert common.canonical_id("012") == common.canonical_id("12") == "12"
  assert common.canonical_id("a12") == "a12"


def test_cc_dev_caption_ids_12_and_012_are_one_image(tmp_path):
  src = tmp_path / "cc"
  os.makedirs(src)
  for key in ("12", "012"):
    np.savez(src / f"{key}.npz", x=np.ones((2, 2048)), bbox=np.float32([[1, 1, 5, 5]] * 2),
             num_bbox=2, image_h=10, image_w=10)
  _write(src / "captions.tsv", "12\tone\n012\ttwo\n")
  data = tmp_path / "data"
  _assert_one_error(_prepare("cc_dev", src, data), "captions.tsv:2", "'012'", "'12'")
  _assert_nothing_left(data)


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    if os.environ.get("RERANK_REQUIRE_OPTIONAL"):
      raise
    pytest.skip("torch (optional extra) not installed; RERANK_REQUIRE_OPTIONAL unset")
  return torch


def _coco(root, captions=None, feats=None):
  """A coco_oscar release with one train image `5` (only the train split's files)."""
  torch = _torch()
  src = root / "coco"
  os.makedirs(src)
  _write(src / "train_img_keys.tsv", "5\n")
  torch.save({5: ["a cat", "a dog"]} if captions is None else captions, src / "train_captions.pt")
  torch.save({5: torch.ones(2, 2054)} if feats is None else feats,
             src / "train_img_frcnn_feats.pt")
  return src


def test_coco_caption_keys_5_and_str_5_are_one_image(tmp_path):
  src = _coco(tmp_path, captions={5: ["a cat"], "5": ["a dog"]})
  data = tmp_path / "data"
  _assert_one_error(_prepare("coco_oscar", src, data, "--splits=train"), "train_captions.pt",
                    "image id '5'", "image id 5 ", "one image")
  _assert_nothing_left(data)


# ---- bad values -------------------------------------------------------------------------


def test_num_boxes_0_names_file_and_line_and_is_skippable(tmp_path):
  src = _flickr(tmp_path, rows=[_row("11"), "12\t500\t400\t0\t\t\n", _row("21"), _row("31")])
  data = tmp_path / "data"
  _assert_one_error(_prepare("flickr30k_butd", src, data), "feats.tsv:2", "num_boxes",
                    "expected 1 to 100 regions; found 0")
  _assert_nothing_left(data)
  out = _skipped(_prepare("flickr30k_butd", src, data, "--skip_bad"))
  assert out["skipped"] == {"bad_region_count": 1} and out["splits"]["train"]["images"] == 1


@pytest.mark.parametrize("w", ["100000000000000000000000", "1e23", "-3"])
def test_huge_or_bad_image_width_is_one_line(tmp_path, w):
  row = _row("12", w=w)
  src = _flickr(tmp_path, rows=[_row("11"), row, _row("21"), _row("31")])
  data = tmp_path / "data"
  _assert_one_error(_prepare("flickr30k_butd", src, data), "feats.tsv:2")
  _assert_nothing_left(data)


def test_cc_dev_image_width_1e23_is_one_line(tmp_path):
  src = tmp_path / "cc"
  os.makedirs(src)
  np.savez(src / "a.npz", x=np.ones((2, 2048)), bbox=np.float32([[1, 1, 5, 5]] * 2), num_bbox=2,
           image_h=10, image_w=1e23)
  _write(src / "captions.tsv", "a\tone caption\n")
  data = tmp_path / "data"
  _assert_one_error(_prepare("cc_dev", src, data), "a.npz", "image size", "1e+23")
  _assert_nothing_left(data)


def test_latin1_caption_file_names_the_file(tmp_path):
  src = _flickr(tmp_path)
  _write(src / "Sentences" / "12.txt", "a caf\xe9 by the sea\n".encode("latin-1"), mode="wb")
  data = tmp_path / "data"
  _assert_one_error(_prepare("flickr30k_butd", src, data), "12.txt:1", "UTF-8", "0xe9",
                    skippable=False)
  _assert_nothing_left(data)


def test_latin1_split_list_names_the_file(tmp_path):
  src = _flickr(tmp_path)
  _write(src / "val.txt", "21\n\xe9\n".encode("latin-1"), mode="wb")
  _assert_one_error(_prepare("flickr30k_butd", src, tmp_path / "data"), "val.txt:2", "UTF-8",
                    skippable=False)


@pytest.mark.parametrize("content,words", [
    (b"", ("train_captions.pt", "empty (0 bytes)")),
    ("list", ("train_captions.pt", "expected a dict of image id", "found list")),
])
def test_empty_or_list_typed_coco_pt_is_one_line(tmp_path, content, words):
  src = _coco(tmp_path, captions=[["a cat"]] if content == "list" else None)
  if content == b"":
    _write(src / "train_captions.pt", b"", mode="wb")
  data = tmp_path / "data"
  _assert_one_error(_prepare("coco_oscar", src, data, "--splits=train"), *words, skippable=False)
  _assert_nothing_left(data)


def test_coco_feature_value_oops_names_the_id(tmp_path):
  torch = _torch()
  src = _coco(tmp_path, feats={5: "oops", 6: torch.ones(1, 2054)})
  _write(src / "train_img_keys.tsv", "5\n6\n")
  torch.save({5: ["a cat"], 6: ["a dog"]}, src / "train_captions.pt")
  data = tmp_path / "data"
  _assert_one_error(_prepare("coco_oscar", src, data, "--splits=train"),
                    "train_img_frcnn_feats.pt: image id 5", "'oops'")
  _assert_nothing_left(data)
  out = _skipped(_prepare("coco_oscar", src, data, "--splits=train", "--skip_bad"))
  assert out["skipped"] == {"malformed_row": 1} and out["splits"]["train"]["images"] == 1


def test_zero_width_caption_is_empty(tmp_path):
  src = _flickr(tmp_path)
  _write(src / "Sentences" / "12.txt", "a fine caption\n\u200b\u200c\ufeff \u2060\nanother\n")
  data = tmp_path / "data"
  _assert_one_error(_prepare("flickr30k_butd", src, data), "12.txt", "caption 1 is empty")
  _assert_nothing_left(data)
  out = _skipped(_prepare("flickr30k_butd", src, data, "--skip_bad"))
  assert out["skipped"] == {"empty_caption": 1} and out["splits"]["train"]["captions"] == 4
  assert common.is_blank("\u00ad\u200d ") and not common.is_blank("a\u200bb")


def test_split_list_id_cannot_reach_outside_the_source_dir(tmp_path):
  # Without the check, Sentences/../../x.txt is tmp_path/x.txt: read into the dataset.
  src = _flickr(tmp_path, splits=(("train", ["11", "../../x"]), ("val", ["21"]), ("test", ["31"])))
  _write(tmp_path / "x.txt", "secret outside the source directory\n")
  data = tmp_path / "data"
  _assert_one_error(_prepare("flickr30k_butd", src, data), "train.txt:2", "'../../x'",
                    "plain name")
  _assert_nothing_left(data)
  out = _skipped(_prepare("flickr30k_butd", src, data, "--skip_bad"))
  assert out["skipped"] == {"malformed_row": 1}
  _, index = tfds_builders.open_split(str(data), "flickr30k_butd", "train", with_index=True)
  assert index["image_ids"] == ["11"] and "secret" not in json.dumps(index)


# ---- interrupted prepares ---------------------------------------------------------------


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait(timeout=60)
  return p.pid


def test_a_killed_prepare_leaves_a_directory_the_next_one_removes(tmp_path):
  data = tmp_path / "data"
  cmd = [sys.executable, "-m", "rerank.data.prepare", "--dataset=synthetic_scenes",
         f"--data_dir={data}", "--num_images=20000", "--splits=train"]
  proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not (os.path.isdir(data) and os.listdir(data)) and time.time() < deadline:
      assert proc.poll() is None, "prepare ended before it could be killed"
      time.sleep(0.05)
    left = os.listdir(data)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait(timeout=60)
  assert len(left) == 1 and left[0].startswith(".synthetic_scenes-incomplete-"), left
  assert f"-{proc.pid}-" in left[0]  # the name records the writer
  # A build of another dataset leaves it alone; the next build of the same one removes it.
  res = _prepare("synthetic_scenes", "", data, "--num_images=4", "--splits=test")
  assert res.returncode == 0, res.stderr[-2000:]
  assert sorted(os.listdir(data)) == ["synthetic_scenes"]


def test_stale_directories_go_live_and_unknown_ones_stay(tmp_path):
  data = tmp_path / "data"
  host = tfds_builders._host()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    names = {
        "dead": f".flickr30k_butd-incomplete-{host}-{_dead_pid()}-abc123",
        "live": f".flickr30k_butd-incomplete-{host}-{live.pid}-def456",
        "other_host": f".flickr30k_butd-incomplete-elsewhere-{_dead_pid()}-ghi789",
        "legacy": ".flickr30k_butd-incomplete-q1w2e3r4",
        "other_dataset": f".cc_dev-incomplete-{host}-{_dead_pid()}-jkl012",
    }
    for name in names.values():
      _write(data / name / "flickr30k_butd" / "1.0.0" / "part", "x")
    removed = tfds_builders.remove_stale(str(data), "flickr30k_butd")
    assert removed == [str(data / names["dead"])]
    assert sorted(os.listdir(data)) == sorted(v for k, v in names.items() if k != "dead")
  finally:
    live.kill()
    live.wait(timeout=60)


def test_an_overwrite_killed_between_its_renames_gets_the_old_dataset_back(tmp_path):
  src = _flickr(tmp_path)
  data = tmp_path / "data"
  prepare.prepare("flickr30k_butd", str(src), str(data))
  final = tfds_builders.dataset_dir(str(data), "flickr30k_butd")
  # The state after `rename(final, old)` and before `rename(new, final)`:
  old = data / f".flickr30k_butd-old-{tfds_builders._host()}-{_dead_pid()}-zz9"
  os.makedirs(old)
  os.rename(final, old / "1.0.0")
  res = _prepare("flickr30k_butd", src, data)  # no --overwrite: the restored one is kept
  assert "already exists" in res.stderr and res.returncode == 2
  assert not old.exists()
  assert len(tfds_builders.open_split(str(data), "flickr30k_butd", "train")) == 2


# ---- further probes ---------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"not gzip at all", "cut"])
def test_broken_gz_caption_file_names_the_file(tmp_path, content):
  import gzip  # pylint: disable=g-import-not-at-top
  src = tmp_path / "m30k"
  _write(src / "image_splits" / "train.txt", "11\n")
  _write(src / "feats.tsv", _row("11"))
  whole = gzip.compress(b"a caption\n" * 50)
  _write(src / "train.en.gz", whole[:len(whole) // 2] if content == "cut" else content, mode="wb")
  data = tmp_path / "data"
  _assert_one_error(_prepare("multi30k", src, data, "--splits=train",
                             f"--features={src / 'feats.tsv'}"), "train.en.gz", "gzip",
                    skippable=False)
  _assert_nothing_left(data)


@pytest.mark.parametrize("flag", ["--seed=-1", "--num_images=-3"])
def test_negative_synthetic_flags_name_the_flag(tmp_path, flag):
  res = _prepare("synthetic_scenes", "", tmp_path / "data", flag)
  assert res.returncode == 2 and res.stderr.strip() == (
      f"error: {flag.split('=')[0]}: expected an integer >= 0; found {flag.split('=')[1]}")
  _assert_nothing_left(tmp_path / "data")
