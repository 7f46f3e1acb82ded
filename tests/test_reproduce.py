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
ALL_CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "paper", "*.py"))
                     if os.path.basename(p) not in ("__init__.py", "common.py"))
# Table 9's fusion rows re-evaluate the flickr30k joint workdir; the others are training rows.
FUSION_CONFIGS = sorted(os.path.join(REPO, config)
                        for config, _ in paper_tables.FUSION_ROWS.values())
CONFIGS = [p for p in ALL_CONFIGS if p not in FUSION_CONFIGS]
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
  assert all(os.path.exists(p) for p in FUSION_CONFIGS) and len(FUSION_CONFIGS) == 3
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
  # Each metric has its published value (ref) and our difference (delta), or "missing".
  joint_rr = rows[("joint", "RR")]
  assert [joint_rr[f"t2i R@{k} ref"] for k in (1, 5, 10)] == ["76.4", "93.6", "96.2"]
  assert [joint_rr[f"t2i R@{k} delta"] for k in (1, 5, 10)] == ["+0.6", "-6.6", "-4.2"]
  assert joint_rr["i2t R@1 ref"] == joint_rr["i2t R@1 delta"] == "missing"  # not published
  assert joint_rr["ref source"] == "authors' release (t2i R@1, t2i R@5, t2i R@10)"
  joint_be = rows[("joint", "BE")]  # Flickr30k Joint+BE: no published cell
  assert joint_be["t2i R@1"] == "70.0" and joint_be["t2i R@1 ref"] == "missing"
  assert joint_be["t2i R@1 delta"] == "missing" and joint_be["ref source"] == "missing"
  assert rows[("be", "BE")]["mR"] == f"{(60 + 70 + 75 + 61 + 71 + 76) / 6:.1f}"
  assert float(rows[("be", "BE")]["s/query"]) == pytest.approx(0.002)
  for key in (("ce", "CE"), ("separate", "RR"), ("joint_ance", "BE")):  # no run: no numbers
    values = [v for k, v in rows[key].items() if k not in ("row", "method")]
    assert set(values) <= {"missing", "-"}, rows[key]
  assert "| joint | RR | 77.0 | 76.4 | +0.6 | 87.0 | 93.6 | -6.6 |" in md
  assert "| ce | CE | missing | missing | missing |" in md
  assert "- authors' release: UKPLab/MMT-Retrieval README" in md
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
  # Published values with their sources, and which tables have none.
  assert "k10 RR" in r.stdout and "ref t2i R@1 54.8, i2t R@1 70.9 [paper Table 8]" in r.stdout
  assert "ref t2i R@1 76.7 [paper Table 9]" in r.stdout
  assert "published: none recovered (missing)" in r.stdout
  assert "latency per query, 50k images: BE 0.016, RR 0.074, CE 120 [paper Table 3]" in r.stdout
  assert "paper Table 4: Geigle et al. 2022, Table 4" in r.stdout
  run = _write(tmp_path, "j", _results("coco_oscar", "test1k", [("BE", 70.0), ("RR", 75.0)]))
  out = tmp_path / "tables" / "coco1k"
  r = _run("rerank.reproduce", "--table=coco1k", f"--workdirs=joint={run}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert "| joint | RR | 75.0 |" in (tmp_path / "tables" / "coco1k.md").read_text()
  assert sorted(os.listdir(tmp_path / "tables")) == ["coco1k.csv", "coco1k.md"]
  # Table 1's R@1 (both directions) and the release's R@5/R@10 beside a 5k run, with sources.
  five_k = _write(tmp_path, "j5k", _results("coco_oscar", "test", [("BE", 50.0), ("RR", 55.0)]))
  r = _run("rerank.reproduce", "--table=coco5k", f"--workdirs=joint={five_k}")
  assert r.returncode == 0, r.stderr
  header = next(line for line in r.stdout.splitlines() if line.startswith("| row |"))
  assert "| t2i R@1 | t2i R@1 ref | t2i R@1 delta | t2i R@5 |" in header
  assert "| ref source |" in header
  # ours 55.0 / 65.0 / 70.0 (t2i), 56.0 (i2t R@1) against 54.7 / 81.3 / 88.9 and 70.8.
  assert ("| joint | RR | 55.0 | 54.7 | +0.3 | 65.0 | 81.3 | -16.3 | 70.0 | 88.9 | -18.9 "
          "| 56.0 | 70.8 | -14.8 | 66.0 | missing | missing |") in r.stdout
  assert "paper Table 1 (t2i R@1, i2t R@1); authors' release (t2i R@5, t2i R@10)" in r.stdout
  assert "| ce | CE | missing | 52.6 | missing |" in r.stdout
  assert "- paper Table 1: Geigle et al. 2022, Table 1" in r.stdout
  r = _run("rerank.reproduce", "--table=coco5k", f"--workdirs=joint={run}", f"--out={out}x")
  assert r.returncode != 0 and r.stderr.startswith("error:") and "test1k" in r.stderr
  assert not os.path.exists(f"{out}x.md")


def _distinct_smoke_runs(paths):
  """The paths whose runlocal config differs from every earlier one's: a COCO row and its
  Flickr30k twin smoke-train the same config (generated data, the same OSCAR layout)."""
  seen, out = set(), []
  for path in paths:
    key = json.dumps(_load(path, "runlocal")[1].to_dict(), sort_keys=True)
    if key not in seen:
      seen.add(key)
      out.append(path)
  return out


# Every distinct runlocal config trains, so a config that rots fails CI (of the fusion rows,
# which train like flickr30k_joint, one: its evaluation reranks with a weighted fusion).
# test_configs.py checks that each runlocal variant keeps its row's distinguishing settings.
@pytest.mark.parametrize("name", [os.path.basename(p)[:-3] for p in _distinct_smoke_runs(
    CONFIGS + [f for f in FUSION_CONFIGS if f.endswith("_w01.py")])])
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
  # MSCOCO 5k: Table 8's R@1 beside each k.
  coco = _results("coco_oscar", "test", [("RR", 55.0)])
  coco["rows"][0]["k"] = 10
  k10 = reproduce.load_run(_write(tmp_path, "coco_k10", coco))
  _, table_csv = reproduce.render("coco5k_k", reproduce.collect("coco5k_k", {"k10": k10}))
  rows = {r["row"]: r for r in csv.DictReader(io.StringIO(table_csv))}
  assert (rows["k10"]["t2i R@1 ref"], rows["k10"]["t2i R@1 delta"]) == ("54.8", "+0.2")
  assert (rows["k10"]["i2t R@1 ref"], rows["k10"]["i2t R@1 delta"]) == ("70.9", "-14.9")
  assert rows["k50"]["i2t R@1 ref"] == "70.7" and rows["k50"]["i2t R@1"] == "missing"
  assert rows["k100"]["t2i R@1 ref"] == "missing" and rows["k10"]["ref source"] == (
      "paper Table 8 (t2i R@1, i2t R@1)")


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
  assert rows[("de", "RR")]["mR ref"] == "79.2"
  assert rows[("de", "RR")]["mR delta"] == f"{mr - 79.2:+.1f}"
  assert rows[("de", "BE")]["mR ref"] == "missing"  # the release's mR is compared on RR
  assert rows[("en", "RR")]["mR"] == "missing" and rows[("en", "RR")]["mR ref"] == "83.0"
  assert rows[("en", "RR")]["mR delta"] == "missing"
  with pytest.raises(ValueError, match="row needs 'en'"):
    reproduce.collect("multi30k", {"en": de})


@pytest.mark.parametrize("path", FUSION_CONFIGS, ids=os.path.basename)
def test_fusion_config_is_the_joint_row_with_its_fusion(path):
  module, c = _load(path)
  _, joint = _load(os.path.join(REPO, "configs", "paper", "flickr30k_joint.py"))
  fusion, weight = next(f for config, f in paper_tables.FUSION_ROWS.values()
                        if os.path.join(REPO, config) == path)
  assert (c.eval.fusion, c.eval.fusion_weight) == (fusion, weight)
  assert c.eval.fusion in ("standard", "combination", "combination_normalized", "rank")
  assert type(c.eval.fusion_weight) is float
  # Everything but the fusion is the joint row's: the workdir it re-evaluates was trained by it.
  # (Whether the joint config already has the two fields depends on the evaluator's defaults.)
  fused = {"eval.fusion", "eval.fusion_weight"}
  leaves, joint_leaves = _leaves(c.to_dict()), _leaves(joint.to_dict())
  assert set(leaves) - set(joint_leaves) <= fused and set(joint_leaves) <= set(leaves)
  assert ({k: v for k, v in leaves.items() if k not in fused}
          == {k: v for k, v in joint_leaves.items() if k not in fused})
  _, demo = _load(os.path.join(REPO, "configs", "demo.py"))
  for key in fused & set(_leaves(demo.to_dict())):  # same types as the trainer's defaults
    assert type(leaves[key]) is type(_leaves(demo.to_dict())[key]), key
  name = os.path.basename(path)
  for needed in (f"--config=configs/paper/{name}", f"--config=configs/paper/{name}:runlocal",
                 "python -m rerank.evaluate", "--workdir=workdirs/flickr30k_joint",
                 "launch/tpu_pod.sh", "rerank.data.prepare", "rerank.convert"):
    assert needed in module.__doc__, needed
  assert _assigned(path) >= {"c.eval.fusion", "c.eval.fusion_weight"}
  local = _load(path, "runlocal")[1]
  assert local.dataset.name == "synthetic_scenes" and local.eval.fusion == fusion


def test_fusion_table_checks_the_run_fusion_and_compares_table_9(tmp_path):
  def run(name, fusion=None, weight=None):
    results = _results("flickr30k_butd", "test", [("BE", 70.0), ("RR", 77.0)])
    if fusion is not None:
      results["rows"][1]["fusion"] = {"mode": fusion, "weight": weight}  # as the evaluator
    return reproduce.load_run(_write(tmp_path, name, results))

  runs = {"standard": run("plain"), "w0.1": run("w01", "combination", 0.1)}
  _, table_csv = reproduce.render("flickr30k_fusion",
                                  reproduce.collect("flickr30k_fusion", runs))
  rows = {r["row"]: r for r in csv.DictReader(io.StringIO(table_csv))}
  assert [rows[k]["t2i R@1 ref"] for k in ("standard", "w0.1", "w0.9")] == ["76.4", "76.7", "74.6"]
  assert (rows["standard"]["t2i R@1 delta"], rows["w0.1"]["t2i R@1 delta"]) == ("+0.6", "+0.3")
  assert rows["w0.9"]["t2i R@1"] == rows["w0.9"]["t2i R@1 delta"] == "missing"
  assert rows["w0.1"]["ref source"] == "paper Table 9 (t2i R@1)"
  # A run reranked another way than the row says is an error naming the config to evaluate.
  with pytest.raises(ValueError, match="flickr30k_fusion_w09.py"):
    reproduce.collect("flickr30k_fusion", {"w0.9": runs["w0.1"]})
  with pytest.raises(ValueError, match=r"row needs \('combination', 0.1\)"):
    reproduce.collect("flickr30k_fusion", {"w0.1": runs["standard"]})  # no fusion: CE alone
  assert reproduce.run_fusion({"fusion": {"mode": "standard", "weight": 0.5}}) == ("standard", 0.0)
  assert reproduce.run_fusion({"fusion": {"mode": "rank", "weight": 0.5}}) == ("rank", 0.5)
