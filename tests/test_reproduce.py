"""Paper configs load and validate; reproduce tabulates results; runlocal variants train."""

import ast
import csv
import glob
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from rerank import reproduce
from rerank.evaluation import paper_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "paper", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))
# The authors' released settings per method: (mode, lr, steps, ANCE).
AUTHORS = {
    "be": ("be", 2e-5, 30_000, False),
    "ce": ("ce", 5e-5, 100_000, False),
    "separate": ("separate", 5e-5, 30_000, False),  # Joint's lr and steps for both weight sets
    "joint": ("joint_alternate", 5e-5, 30_000, False),
    "joint_ance": ("joint_alternate", 2e-5, 15_000, True),
}


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location("paper_row", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


def _leaves(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_leaves(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _assigned(path):
  """Dotted targets assigned in the file's get_config (`c.lr = ...` -> "c.lr")."""
  fn = next(n for n in ast.parse(open(path).read()).body
            if isinstance(n, ast.FunctionDef) and n.name == "get_config")
  return {ast.unparse(t) for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign))
          for t in (n.targets if isinstance(n, ast.Assign) else [n.target])}


def test_every_method_and_dataset_has_a_config():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  expected = {f"{d}_{m}" for d, methods in paper_tables.DATASET_METHODS.items() for m in methods}
  assert names == expected
  for _, (_, rows) in paper_tables.TABLES.items():
    for row in rows:
      assert os.path.exists(os.path.join(REPO, row.config.partition(":")[0])), row


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates(path):
  module, c = _load(path)
  _, demo = _load(os.path.join(REPO, "configs", "demo.py"))
  # Same field set as the demo (which the trainer reads), same value types: no unknown or
  # missing fields, no int where a float belongs.
  leaves, demo_leaves = _leaves(c.to_dict()), _leaves(demo.to_dict())
  assert set(leaves) == set(demo_leaves)
  for key, value in leaves.items():
    assert type(value) is type(demo_leaves[key]), (key, value, demo_leaves[key])
  # The trainer loads configs locked: an unknown field is an error.
  c.lock()
  with pytest.raises(AttributeError):
    c.learning_rate = 1.0

  dataset, method = os.path.basename(path)[:-3].split("_", 1)
  mode, lr, steps, ance = AUTHORS[method]
  assert (c.mode, c.lr, c.total_steps) == (mode, lr, steps)
  m3p = dataset == "multi30k"
  assert (c.seed, c.batch_size, c.max_regions) == (123456789, 128, 50)
  assert c.max_text_len == (128 if m3p else 72)
  assert (c.model.visual, c.model.order) == (("m3p", "image_first") if m3p else
                                             ("oscar", "text_first"))
  assert (c.warmup_steps, c.weight_decay, c.adam_eps, c.clip_norm) == (0, 0.05, 1e-6, 1.0)
  assert (c.loss.be, c.loss.margin, c.loss.ce) == ("vsepp", 0.1, "pairwise")
  assert c.eval.k == 20 and "k" not in c.search  # one rerank depth: eval.k
  assert bool(c.hard_negatives.every) == ance
  if ance:
    assert (c.hard_negatives.top, c.hard_negatives.ce_prob, c.hard_negatives.be_negatives) == (
        50, 0.05, 7)
  # Declared data and weights; sizes that fit together.
  assert c.dataset.name == paper_tables.DATASETS[dataset][0]
  assert c.dataset.data_dir and c.init_from
  assert c.eval.split == paper_tables.DATASETS[dataset][1]
  assert c.model.feature_dim + c.model.box_dim == 2054
  assert c.model.hidden_size % c.model.num_heads == 0
  assert c.max_text_len + c.max_regions <= c.model.max_position_embeddings
  # The docstring says how to launch it and which data and weights it needs; the
  # hyperparameters are in the code, not in prose.
  doc = module.__doc__
  name = os.path.basename(path)
  for needed in (f"--config=configs/paper/{name}", f"--config=configs/paper/{name}:runlocal",
                 "launch/tpu_pod.sh", "rerank.data.prepare", "rerank.convert",
                 f"data/tfds/{c.dataset.name}", c.init_from):
    assert needed in doc, needed
  for prose in ("DESIGN.md", "Reference", "lr ", "steps,", "Hyperparameters"):
    assert prose not in doc, prose
  # The row's own hyperparameters are assignments a reader sees in its get_config.
  assert _assigned(path) >= {"c.mode", "c.lr", "c.total_steps", "c.batch_size", "c.eval.k",
                             "c.loss.be", "c.loss.ce"}

  local = _load(path, "runlocal")[1]
  assert local.dataset.name == "synthetic_scenes" and not local.init_from
  assert not local.dataset.data_dir and local.total_steps == 2
  assert (local.mode, local.lr) == (mode, lr)
  other = _load(path, "split=test1k,data_dir=/d,init_from=/w,k=50")[1]
  assert (other.eval.split, other.dataset.data_dir, other.init_from, other.eval.k) == (
      "test1k", "/d", "/w", 50)
  with pytest.raises(ValueError, match="unknown"):
    _load(path, "splits=test")


def _results(dataset, split, rows):
  out = {"dataset": dataset, "split": split, "num_images": 1000, "num_texts": 5000, "rows": []}
  for method, r1 in rows:
    t = {"R@1": r1, "R@5": r1 + 10, "R@10": r1 + 15}
    i = {"R@1": r1 + 1, "R@5": r1 + 11, "R@10": r1 + 16}
    out["rows"].append({"model": "joint", "method": method, "k": 20, "t2i": t, "i2t": i,
                        "mR": (sum(t.values()) + sum(i.values())) / 6, "rsum": 0.0,
                        "seconds_per_query": 0.002, "queries": {"t2i": 5000, "i2t": 1000}})
  return out


def _write(tmp_path, name, results):
  d = tmp_path / name
  d.mkdir()
  (d / "results.json").write_text(json.dumps(results))
  return str(d)


def test_reproduce_renders_missing_runs_and_reference_differences(tmp_path):
  joint = _write(tmp_path, "joint",
                 _results("flickr30k_butd", "test", [("BE", 70.0), ("RR", 77.0)]))
  be = _write(tmp_path, "be", _results("flickr30k_butd", "test", [("BE", 60.0)]))
  runs = {"joint": reproduce.load_run(joint), "be": reproduce.load_run(be)}
  md, table_csv = reproduce.render("flickr30k", reproduce.collect("flickr30k", runs))
  rows = {(r["row"], r["method"]): r for r in csv.DictReader(io.StringIO(table_csv))}
  assert len(rows) == len(paper_tables.TABLES["flickr30k"][1])
  assert rows[("joint", "RR")]["t2i R@1"] == "77.0"
  assert rows[("joint", "RR")]["i2t R@10"] == "93.0"
  assert rows[("joint", "RR")]["reference"] == "t2i 76.4/93.6/96.2"
  assert rows[("joint", "RR")]["difference"] == "t2i +0.6/-6.6/-4.2"
  assert rows[("joint", "BE")]["difference"] == "t2i -1.6/-11.5/-10.0"
  assert rows[("be", "BE")]["mR"] == f"{(60 + 70 + 75 + 61 + 71 + 76) / 6:.1f}"
  assert float(rows[("be", "BE")]["s/query"]) == pytest.approx(0.002)
  for key in (("ce", "CE"), ("separate", "RR"), ("joint_ance", "BE")):  # no run: no numbers
    values = [v for k, v in rows[key].items() if k not in ("row", "method")]
    assert set(values) <= {"missing", "-"}, rows[key]
  assert "| joint | RR | 77.0 |" in md and "| ce | CE | missing |" in md
  # A run without the row's method is missing too (a BE-only run has no RR).
  rows = reproduce.collect("flickr30k", {"separate": reproduce.load_run(be)})
  assert [r["metrics"] is None for r in rows if r["row"].label.startswith("separate")] == [
      False, True]


def test_reproduce_rejects_mismatched_runs(tmp_path):
  five_k = reproduce.load_run(_write(tmp_path, "c", _results("coco_oscar", "test", [("BE", 50.0)])))
  with pytest.raises(ValueError, match="needs 'test1k'"):
    reproduce.collect("coco1k", {"joint": five_k})
  with pytest.raises(ValueError, match="needs 'flickr30k_butd'"):
    reproduce.collect("flickr30k", {"joint": five_k})
  with pytest.raises(ValueError, match="unknown row key"):
    reproduce.collect("coco5k", {"jointt": five_k})
  with pytest.raises(ValueError, match="not valid JSON"):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    reproduce.load_run(str(bad))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def test_reproduce_cli_lists_and_writes_atomically(tmp_path):
  r = _run("rerank.reproduce", "--list")
  assert r.returncode == 0, r.stderr
  for table in paper_tables.TABLES:
    assert f"{table}: " in r.stdout
  run = _write(tmp_path, "j", _results("coco_oscar", "test1k", [("BE", 70.0), ("RR", 75.0)]))
  out = tmp_path / "tables" / "coco1k"
  r = _run("rerank.reproduce", "--table=coco1k", f"--workdirs=joint={run}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert "| joint | RR | 75.0 |" in (tmp_path / "tables" / "coco1k.md").read_text()
  assert sorted(os.listdir(tmp_path / "tables")) == ["coco1k.csv", "coco1k.md"]
  r = _run("rerank.reproduce", "--table=coco5k", f"--workdirs=joint={run}", f"--out={out}x")
  assert r.returncode != 0 and r.stderr.startswith("error:") and "test1k" in r.stderr
  assert not os.path.exists(f"{out}x.md")


# Every paper config's runlocal variant trains, so a config that rots fails CI.
@pytest.mark.parametrize("name", [os.path.basename(p)[:-3] for p in CONFIGS])
def test_runlocal_variant_trains(tmp_path, name):
  r = _run("rerank.train", f"--config=configs/paper/{name}.py:runlocal",
           f"--workdir={tmp_path}", "--config.total_steps=2")
  assert r.returncode == 0, r.stderr[-2000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["rows"], results


def test_k_ablation_rows_check_the_rerank_depth(tmp_path):
  run = _results("flickr30k_butd", "test", [("BE", 70.0), ("RR", 76.0)])  # fixture RR has k=20
  k20 = reproduce.load_run(_write(tmp_path, "k20", run))
  rows = reproduce.collect("flickr30k_k", {"k20": k20})
  assert [r["metrics"] is not None for r in rows] == [False, True, False, False]
  with pytest.raises(ValueError, match="row needs k=50"):
    reproduce.collect("flickr30k_k", {"k50": k20})


def test_transfer_tables_expect_the_target_dataset_and_split(tmp_path):
  coco_run_on_flickr = reproduce.load_run(
      _write(tmp_path, "z", _results("flickr30k_butd", "test", [("BE", 50.0), ("RR", 55.0)])))
  rows = reproduce.collect("zeroshot_coco_to_flickr30k", {"joint": coco_run_on_flickr})
  assert [r["metrics"]["t2i"]["R@1"] for r in rows] == [50.0, 55.0]
  with pytest.raises(ValueError, match=paper_tables.ENLARGED_FLICKR.replace("+", r"\+")):
    reproduce.collect("flickr30k_enlarged", {"joint": coco_run_on_flickr})


def test_multi30k_rows_check_language_and_compare_mr(tmp_path):
  run = _results("multi30k", "test_2016", [("BE", 60.0), ("RR", 70.0)])
  run["language"] = "de"
  de = reproduce.load_run(_write(tmp_path, "de", run))
  _, table_csv = reproduce.render("multi30k", reproduce.collect("multi30k", {"de": de}))
  rows = {(r["row"], r["method"]): r for r in csv.DictReader(io.StringIO(table_csv))}
  mr = (70 + 80 + 85 + 71 + 81 + 86) / 6
  assert rows[("de", "RR")]["reference"] == "mR 79.2"
  assert rows[("de", "RR")]["difference"] == f"mR {mr - 79.2:+.1f}"
  assert rows[("en", "RR")]["mR"] == "missing" and rows[("en", "RR")]["difference"] == "missing"
  with pytest.raises(ValueError, match="row needs 'en'"):
    reproduce.collect("multi30k", {"en": de})
