"""Nothing we load runs code, and every malformed file we read is one error naming it.

Probes of issue 15 ("code run from data" and the loaders' bad input): index directories
(checksums, ScaNN's pickle, NaN rows, bad index.json), safetensors headers, the torch floor and
converter family mistakes. Each builds its tiny fixture here and asserts the error, its key
words (file, field or tensor) and that nothing was left behind.
"""

import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from safetensors import numpy as st_numpy

from rerank import errors
from rerank.data.sources import common as sources_common
from rerank.indexing import indexes
from rerank.models import convert as convert_lib
from rerank.models import encoder as encoder_lib
from rerank.models import families
from rerank.models import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_convert import BERT_VOCAB, H, _bert_config, _bert_shapes, _random_state, _write  # noqa: E402


def _run(module: str, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("RERANK_DEBUG", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False, timeout=480)


def _one_error_line(proc) -> str:
  """The single `error:` line of a failed command (exit 2, no traceback)."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


def _unit(n, d, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------ index directories


def _saved(tmp_path, backend="exact", n=300, d=8):
  path = str(tmp_path / "idx")
  index = indexes.build(_unit(n, d), backend)
  indexes.save(index, path, {"fingerprint": "abc", "dim": d}, {"image_ids": np.arange(n) + 100})
  return index, path


class _WritesMarker:
  """Unpickling this creates `path`: proof that a loader ran code from data."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
  """tempfile's directory, to see what a load leaves in it."""
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp))
  return tmp


def test_scann_load_never_unpickles_docids(tmp_path, private_tmp):
  index, path = _saved(tmp_path, "scann", n=600)
  marker = tmp_path / "code-ran"
  with open(os.path.join(path, "scann", "scann_docids.pkl"), "wb") as f:
    pickle.dump(_WritesMarker(str(marker)), f)
  loaded, _, _ = indexes.load(path)
  assert not marker.exists()  # ScaNN read a private copy of the listed assets only
  assert os.listdir(private_tmp) == []  # and that copy is gone
  q = _unit(5, 8, seed=1)
  np.testing.assert_array_equal(loaded.search(q, 5)[0], index.search(q, 5)[0])

  # A crafted index.json that lists the pickle, with its true checksum, is refused outright.
  meta_path = os.path.join(path, "index.json")
  meta = json.load(open(meta_path))
  pkl = os.path.join(path, "scann", "scann_docids.pkl")
  digest, size = indexes._sha256(pkl)  # pylint: disable=protected-access
  meta["files"]["scann/scann_docids.pkl"] = {"bytes": size, "sha256": digest}
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(indexes.IndexFormatError, match=r"scann_docids\.pkl: expected only ScaNN assets"):
    indexes.load(path)
  assert not marker.exists() and os.listdir(private_tmp) == []


def test_scann_asset_path_outside_the_index_is_refused(tmp_path, private_tmp):
  _, path = _saved(tmp_path, "scann", n=600)
  pbtxt = os.path.join(path, "scann", "scann_assets.pbtxt")
  text = open(pbtxt).read().replace('"dataset.npy"', '"/etc/passwd"')
  open(pbtxt, "w").write(text)
  meta_path = os.path.join(path, "index.json")
  meta = json.load(open(meta_path))
  digest, size = indexes._sha256(pbtxt)  # pylint: disable=protected-access
  meta["files"]["scann/scann_assets.pbtxt"] = {"bytes": size, "sha256": digest}
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(indexes.IndexFormatError, match=r"scann_assets\.pbtxt: expected asset paths.*/etc/passwd"):
    indexes.load(path)
  assert os.listdir(private_tmp) == []


@pytest.mark.parametrize("name", ["embeddings.npy", "image_ids.npy"])
def test_changed_file_fails_its_checksum(tmp_path, name):
  _, path = _saved(tmp_path)
  file = os.path.join(path, name)
  x = np.load(file)
  np.save(file, x[::-1].copy() if name == "image_ids.npy" else x * 0.5)  # reordered / tampered
  with pytest.raises(indexes.IndexFormatError, match=rf"{name}: expected \d+ bytes with sha256 .*changed"):
    indexes.load(path)


def test_missing_listed_file_and_older_index_without_checksums(tmp_path):
  _, path = _saved(tmp_path)
  os.remove(os.path.join(path, "image_ids.npy"))
  with pytest.raises(indexes.IndexFormatError, match=r"image_ids\.npy: missing.*incomplete"):
    indexes.load(path)
  meta_path = os.path.join(path, "index.json")
  meta = json.load(open(meta_path))
  del meta["files"]
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(indexes.IndexFormatError, match=r"index\.json: no file checksums.*rebuild"):
    indexes.load(path)


def _record(path):
  """Re-records the checksums, as a writer that produced bad data would have."""
  meta = json.load(open(os.path.join(path, "index.json")))
  indexes._write_meta(path, meta)  # pylint: disable=protected-access


@pytest.mark.parametrize("backend", ["exact", "jax", "scann"])
def test_nan_rows_are_refused_on_load(tmp_path, backend):
  _, path = _saved(tmp_path, backend, n=600)
  file = os.path.join(path, "scann", "dataset.npy") if backend == "scann" else os.path.join(path, "embeddings.npy")
  x = np.load(file)
  x[3, 1] = np.nan
  np.save(file, x)
  _record(path)
  with pytest.raises(indexes.IndexFormatError, match=r"dataset\.npy|embeddings\.npy") as e:
    indexes.load(path)
  assert "NaN or inf in row 3" in str(e.value)


def test_nan_rows_are_never_written(tmp_path):
  x = _unit(50, 8)
  x[7] = np.inf
  with pytest.raises(ValueError, match="embeddings: expected finite rows; found NaN or inf in row 7"):
    indexes.save(indexes.ExactIndex(x), str(tmp_path / "idx"), {})
  assert os.listdir(tmp_path) == []  # no index, no temporary directory


def test_embeddings_of_another_shape_are_refused(tmp_path):
  _, path = _saved(tmp_path)
  np.save(os.path.join(path, "embeddings.npy"), _unit(299, 8))
  _record(path)
  with pytest.raises(indexes.IndexFormatError, match=r"embeddings\.npy: expected float32 \[300, 8\].*\[299, 8\]"):
    indexes.load(path)


@pytest.mark.parametrize("content, words", [
    ("{not json", "found invalid JSON"),
    ('["a list"]', "the file: expected a JSON object"),
    ('{"kind": "bogus", "size": 3, "dim": 2, "files": {}}', 'kind: expected one of exact, jax, scann, sharded; found "bogus"'),
    ('{"kind": "exact", "size": -3, "dim": 2, "files": {}}', "size: expected an integer >= 1; found -3"),
    ('{"kind": "exact", "size": 3, "dim": 2, "files": {"../x.npy": {"bytes": 1, "sha256": "%s"}}}' % ("0" * 64),
     'files: expected paths inside the index directory; found "../x.npy"'),
])
def test_bad_index_json_is_one_error_naming_it(tmp_path, content, words):
  path = tmp_path / "idx"
  path.mkdir()
  (path / "index.json").write_text(content)
  with pytest.raises(indexes.IndexFormatError) as e:
    indexes.load(str(path))
  assert str(e.value).startswith(f"{path / 'index.json'}: ") and words in str(e.value)
  assert isinstance(e.value, errors.UserError)


def test_search_cli_on_a_bad_index_is_one_line(tmp_path):
  path = tmp_path / "idx"
  path.mkdir()
  (path / "index.json").write_text('{"kind": "bogus", "size": 3, "dim": 2, "files": {}}')
  line = _one_error_line(_run("rerank.search", f"--index={path}", "--query=a cube"))
  assert str(path / "index.json") in line and "bogus" in line


def test_sharded_index_checks_every_shard(tmp_path):
  corpus = _unit(400, 8)
  idx = indexes.ShardedIndex([indexes.ExactIndex(corpus[:150]), indexes.ExactIndex(corpus[150:])], [0, 150])
  path = str(tmp_path / "idx")
  indexes.save(idx, path, {})
  indexes.load(path)  # intact: loads
  file = os.path.join(path, "shard-00001", "embeddings.npy")
  np.save(file, np.load(file)[::-1].copy())
  with pytest.raises(indexes.IndexFormatError, match=r"shard-00001.embeddings\.npy: expected .*sha256"):
    indexes.load(path)


def test_sharded_offsets_must_match_the_shards(tmp_path):
  corpus = _unit(400, 8)
  path = str(tmp_path / "idx")
  indexes.save(indexes.ShardedIndex([indexes.ExactIndex(corpus[:150]), indexes.ExactIndex(corpus[150:])],
                                    [0, 150]), path, {})
  meta = json.load(open(os.path.join(path, "index.json")))
  meta["offsets"] = [0, 100]
  json.dump(meta, open(os.path.join(path, "index.json"), "w"))
  with pytest.raises(indexes.IndexFormatError, match=r"offsets: expected \[0, 150\] for shards of \[150, 250\]"):
    indexes.load(path)


def test_jax_query_block_is_bounded(tmp_path):
  _, path = _saved(tmp_path, "jax")
  meta = json.load(open(os.path.join(path, "index.json")))
  meta["query_block"] = 10 ** 12  # would pad every search to 10^12 rows
  json.dump(meta, open(os.path.join(path, "index.json"), "w"))
  with pytest.raises(indexes.IndexFormatError, match=r"query_block: expected an integer in \[1, 65536\]"):
    indexes.load(path)


# ------------------------------------------------------------------ safetensors headers


def _st_file(tmp_path, header, body: bytes = b"", size: int | None = None) -> str:
  text = json.dumps(header).encode()
  path = str(tmp_path / "model.safetensors")
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text) if size is None else size) + text + body)
  return path


_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, body, words", [
    ({"w": {**_F32x2, "data_offsets": [-8, 0]}}, b"\0" * 8, "tensor 'w': data_offsets: expected [begin, end]"),
    ({"a": _F32x2, "b": {**_F32x2, "data_offsets": [4, 12]}}, b"\0" * 12,
     "tensor 'b': data_offsets [4, 12] overlap the previous tensor"),
    ({"a": {**_F32x2, "data_offsets": [8, 16]}}, b"\0" * 16, "tensor 'a': data_offsets [8, 16] leave a gap"),
    ([1, 2], b"", "safetensors header: expected a JSON object; found list"),
    (5, b"", "safetensors header: expected a JSON object; found int"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "tensor 'w': expected dtype, shape and data_offsets; missing data_offsets"),
    ({"w": {**_F32x2, "dtype": "F99"}}, b"\0" * 8, "tensor 'w': dtype: expected one of"),
    ({"w": {**_F32x2, "shape": [-2]}}, b"\0" * 8, "tensor 'w': shape: expected a list of non-negative integers"),
    ({"w": {**_F32x2, "shape": [2 ** 40, 2 ** 40]}}, b"\0" * 8, "tensor 'w': data_offsets [0, 8] hold 8 bytes but shape"),
    ({"w": _F32x2}, b"\0" * 12, "tensors end at byte"),
    ({"w": "x"}, b"", "tensor 'w': expected an object"),
    ({"__metadata__": {"a": 1}, "w": _F32x2}, b"\0" * 8, "__metadata__: expected an object of strings"),
])
def test_malformed_safetensors_is_one_error_naming_file_and_tensor(tmp_path, header, body, words):
  path = _st_file(tmp_path, header, body)
  with pytest.raises(pretrained.ConvertError) as e:
    pretrained.read_state_dict(path)
  assert str(e.value).startswith(f"{path}: ") and words in str(e.value), str(e.value)
  with pytest.raises(Exception):  # the safetensors library refuses every one of them too
    st_numpy.load_file(path)


def test_header_size_past_the_file_is_refused(tmp_path):
  path = _st_file(tmp_path, {"w": _F32x2}, b"\0" * 8, size=1 << 40)
  with pytest.raises(pretrained.ConvertError, match="truncated or not safetensors"):
    pretrained.read_state_dict(path)


def test_valid_safetensors_still_read_as_the_library_does(tmp_path):
  state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0, 4), np.float16),
           "c": np.array(1.5, np.float32)}
  path = str(tmp_path / "ok.safetensors")
  st_numpy.save_file(state, path, metadata={"format": "np"})
  ours, theirs = pretrained.read_state_dict(path), st_numpy.load_file(path)
  assert set(ours) == set(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k].astype(np.float32))


def _oscar_src(tmp_path, rng, **config):
  shapes = {**_bert_shapes("bert.", len(BERT_VOCAB)), "bert.img_embedding.weight": (H, 2054),
            "bert.img_embedding.bias": (H,), "classifier.weight": (2, H), "classifier.bias": (2,)}
  state = _random_state(shapes, rng)
  src = str(tmp_path / "oscar")
  _write(src, state, {**_bert_config(img_feature_dim=2054), **config})
  return src, state


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
  rng = np.random.default_rng(0)
  state = _random_state(_bert_shapes("", len(BERT_VOCAB)), rng)
  state["encoder.layer.1.output.dense.weight"][3, 4] = np.nan
  _write(str(tmp_path / "src"), state, _bert_config())
  with pytest.raises(pretrained.ConvertError, match=r"finite weights; found NaN or inf in 1 tensor\(s\): "
                     r"encoder\.layer\.1\.output\.dense\.weight \(1 of 2048 values\)"):
    convert_lib.convert("bert", str(tmp_path / "src"), str(tmp_path / "dst"), log=lambda *_: None)
  assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/passwd", 3])
def test_sharded_checkpoint_index_cannot_point_outside_src(tmp_path, shard):
  src = tmp_path / "src"
  src.mkdir()
  (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard, "b": "x"}}))
  with pytest.raises(pretrained.ConvertError, match=r"model\.safetensors\.index\.json: "):
    pretrained.find_weights(str(src))


def _encoder_fields(**changes):
  return {**dataclasses.asdict(encoder_lib.EncoderConfig(vocab_size=40, hidden_size=32, num_heads=4)), **changes}


@pytest.mark.parametrize("content, words", [
    ("{torn", "found invalid JSON"),
    (json.dumps({"family": "bert"}), 'expected an object with an "encoder" object'),
    (json.dumps({"encoder": _encoder_fields(hidden_size="32")}), 'encoder.hidden_size: expected int; found "32"'),
    (json.dumps({"encoder": _encoder_fields(remat=1)}), "encoder.remat: expected bool; found 1"),
    (json.dumps({"encoder": _encoder_fields(colour="red")}), "encoder.colour: expected one of the encoder's fields"),
    (json.dumps({"encoder": _encoder_fields(num_heads=5)}), "encoder: "),
])
def test_converted_model_json_is_checked_on_read(tmp_path, content, words):
  (tmp_path / "model.json").write_text(content)
  with pytest.raises(pretrained.ConvertError) as e:
    pretrained.read_meta(str(tmp_path))
  assert str(e.value).startswith(f"{tmp_path / 'model.json'}: ") and words in str(e.value), str(e.value)


def test_converted_model_json_as_written_reads_back(tmp_path):
  (tmp_path / "model.json").write_text(json.dumps({"family": "bert", "encoder": _encoder_fields()}))
  meta = pretrained.read_meta(str(tmp_path))
  assert pretrained.encoder_config(meta).hidden_size == 32


# ------------------------------------------------------------------ torch floor


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    if os.environ.get("RERANK_REQUIRE_OPTIONAL"):
      pytest.fail("torch is required (RERANK_REQUIRE_OPTIONAL is set)")
    pytest.skip("needs torch (pip install -e '.[torch]')")
  return torch


def test_torch_floor_matches_setup_py_and_reads_versions():
  setup = open(os.path.join(ROOT, "setup.py")).read()
  floor = ".".join(map(str, pretrained.TORCH_MIN_VERSION))
  assert f'"torch>={floor}"' in setup and pretrained.TORCH_MIN_VERSION >= (2, 10)
  for version, ok in (("2.5.1", False), ("2.9.1+cu121", False), ("2.3.0", False), ("2.10.0", True),
                      ("2.10.0a0+git1234", True), ("2.13.0+cpu", True), ("3.0.0", True), ("junk", False)):
    assert pretrained.torch_version_ok(version) == ok, version


def test_old_torch_is_one_error_before_anything_is_unpickled(tmp_path, monkeypatch):
  torch = _torch()
  path = str(tmp_path / "pytorch_model.bin")
  torch.save({"w": torch.zeros(2)}, path)
  def never(*a, **k):
    raise AssertionError("torch.load called with an unsafe torch")
  monkeypatch.setattr(torch, "__version__", "2.5.1")
  monkeypatch.setattr(torch, "load", never)
  with pytest.raises(pretrained.ConvertError, match=r"pytorch_model\.bin: .*needs torch >= 2\.10.*found torch 2\.5\.1"):
    pretrained.read_state_dict(path)
  from rerank.data.sources import coco_oscar  # pylint: disable=import-outside-toplevel
  with pytest.raises(sources_common.BadInput, match=r"torch 2\.5\.1: .*needs torch >= 2\.10"):
    coco_oscar._load_pt(path)  # pylint: disable=protected-access


# ------------------------------------------------------------------ converter family mistakes


def test_bert_family_on_oscar_names_the_region_embedding_and_the_family(tmp_path):
  src, _ = _oscar_src(tmp_path, np.random.default_rng(1))
  with pytest.raises(pretrained.ConvertError, match=r"unexpected key\(s\): img_embedding\.bias; "
                     r"img_embedding\.weight\. The keys look like a 'oscar' checkpoint: try --family=oscar"):
    convert_lib.convert("bert", src, str(tmp_path / "dst"), log=lambda *_: None)
  assert sorted(os.listdir(tmp_path)) == ["oscar"]
  # Its classifier (outside the bert. prefix) is still a head: --family=oscar converts it.
  meta = convert_lib.convert("oscar", src, str(tmp_path / "dst"), log=lambda *_: None)
  assert meta["report"]["ignored"] == {"classifier.weight": 1, "classifier.bias": 1}


def test_bert_family_on_unprefixed_oscar_is_an_error_too(tmp_path):
  rng = np.random.default_rng(2)
  shapes = {**_bert_shapes("", len(BERT_VOCAB)), "img_embedding.weight": (H, 2054), "img_embedding.bias": (H,)}
  _write(str(tmp_path / "src"), _random_state(shapes, rng), _bert_config(img_feature_dim=2054))
  with pytest.raises(pretrained.ConvertError, match=r"img_embedding\.weight.*try --family=oscar"):
    convert_lib.convert("bert", str(tmp_path / "src"), str(tmp_path / "dst"), log=lambda *_: None)


def test_m3p_family_on_oscar_is_one_line_naming_the_family(tmp_path):
  src, _ = _oscar_src(tmp_path, np.random.default_rng(3))
  line = _one_error_line(_run("rerank.convert", "--family=m3p", f"--src={src}", f"--dst={tmp_path / 'dst'}"))
  assert "--family=m3p: expected M3P" in line and "try --family=oscar" in line
  assert "sentencepiece" not in line
  assert sorted(os.listdir(tmp_path)) == ["oscar"]


@pytest.mark.parametrize("field, value, words", [
    ("hidden_size", "32", 'hidden_size: expected an integer >= 1; found "32"'),
    ("num_hidden_layers", 2.5, "num_hidden_layers: expected an integer >= 1; found 2.5"),
    ("layer_norm_eps", "1e-12", 'layer_norm_eps: expected a number > 0; found "1e-12"'),
    ("hidden_act", ["gelu"], 'hidden_act: expected a string; found ["gelu"]'),
    ("use_img_layernorm", "yes", 'use_img_layernorm: expected true/false or 0/1; found "yes"'),
])
def test_config_field_of_the_wrong_type_is_one_error(tmp_path, field, value, words):
  src, _ = _oscar_src(tmp_path, np.random.default_rng(4), **{field: value})
  with pytest.raises(pretrained.ConvertError) as e:
    convert_lib.convert("oscar", src, str(tmp_path / "dst"), log=lambda *_: None)
  assert str(e.value) == f"{os.path.join(src, 'config.json')}: {words}"
  assert sorted(os.listdir(tmp_path)) == ["oscar"]


def test_config_type_check_accepts_real_configs():
  families.check_config_types(dict(_bert_config(), layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
                                   use_img_layernorm=1, img_layer_norm_eps=None, pad_token_id=0),
                              "config.json")
