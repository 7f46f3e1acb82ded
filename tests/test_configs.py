"""Every config file builds, configs import as a package, each setting has one home, and a paper
row's smoke variant (runlocal) keeps what sets the row apart."""

import glob
import importlib
import os
import re
import subprocess
import sys

import pytest

from rerank.models import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.relpath(p, REPO) for p in
               glob.glob(os.path.join(REPO, "configs", "*.py"))
               + glob.glob(os.path.join(REPO, "configs", "paper", "*.py"))
               if os.path.basename(p) not in ("__init__.py", "common.py"))


def _module(rel):
  return importlib.import_module(rel[:-3].replace(os.sep, "."))


def test_there_are_configs():
  assert "configs/demo.py" in FILES and "configs/paper/coco_joint.py" in FILES


@pytest.mark.parametrize("rel", FILES)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_config_builds_as_a_package_module(rel, arg):
  c = _module(rel).get_config(arg)
  c.lock()
  assert c.mode and c.total_steps > 0 and c.batch_size > 0 and c.eval.k > 0
  assert "k" not in c.search  # one rerank depth, eval.k, for evaluation and search
  if c.model.get("family", "regions") == "regions":
    assert (c.model.feature_dim, c.model.box_dim) == (2048, 6)
  else:  # a pixel family reads images: its preprocessing, no region width
    assert c.image.kind == c.model.family and "feature_dim" not in c.model


def test_paper_configs_import_as_a_package():
  import configs.paper.coco_joint  # pylint: disable=import-outside-toplevel
  from configs.paper import common  # pylint: disable=import-outside-toplevel
  assert configs.paper.coco_joint.common is common
  assert configs.paper.coco_joint.get_config().lr == 5e-5


def test_region_width_is_set_in_one_place():
  # feature_dim / box_dim (2048 + 6) only in configs/common.py:model_config.
  for path in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True):
    if os.path.relpath(path, REPO) == os.path.join("configs", "common.py"):
      continue
    text = open(path).read()
    assert not re.search(r"feature_dim|box_dim|\b2048\b|\b2054\b", text), path


def test_config_flag_loads_a_paper_config_by_path_from_another_directory(tmp_path):
  # As `--config=configs/paper/coco_joint.py:runlocal` does: ml_collections loads the file by
  # path, and its `from configs.paper import common` must resolve (here through PYTHONPATH).
  code = ("from absl import flags\nfrom rerank import cli\n"
          "def main(argv):\n  c = flags.FLAGS.config\n  print(c.mode, c.eval.k, c.lr, c.total_steps)\n"
          "cli.run(main, cli.define_config_flag)\n")
  config = os.path.join(REPO, "configs", "paper", "coco_joint.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-c", code, f"--config={config}:runlocal,k=3",
                      "--config.lr=0.5"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["joint_alternate", "3", "0.5", "2"]


PAPER = [f for f in FILES if f.startswith(os.path.join("configs", "paper", ""))]
# What sets a paper row apart from the others; its smoke variant must keep each of them, so
# that smoke-training multi30k_joint, coco_joint and flickr30k_joint trains three models.
DISTINGUISHING = ("mode", "lr", "model.visual", "model.order", "model.dtype", "dataset.language",
                  "loss.be", "loss.ce", "hard_negatives.ce_prob", "hard_negatives.be_negatives",
                  "hard_negatives.index", "hard_negatives.temperature", "eval.fusion",
                  "eval.fusion_weight")


def _field(c, dotted):
  for key in dotted.split("."):
    c = c[key]
  return c


def _signature(c):
  return tuple(_field(c, f) for f in DISTINGUISHING) + (bool(c.hard_negatives.every),)


@pytest.mark.parametrize("rel", PAPER)
@pytest.mark.parametrize("arg", ["", "lang=de"])
def test_smoke_variant_keeps_the_rows_distinguishing_settings(rel, arg):
  full = _module(rel).get_config(arg or None)
  smoke = _module(rel).get_config(",".join(filter(None, ["runlocal", arg])))
  assert {f: _field(smoke, f) for f in DISTINGUISHING} == {f: _field(full, f) for f in DISTINGUISHING}
  assert bool(smoke.hard_negatives.every) == bool(full.hard_negatives.every)
  assert smoke.model.dtype == "bfloat16" and smoke.dataset.language == (arg and "de")
  # M3P's layout in full, as the smoke model has no checkpoint to take it from.
  m3p = full.model.visual == "m3p"
  assert (smoke.model.positions, smoke.model.type_vocab_size) == (
      ("sequence", 0) if m3p else ("text", 2))
  # The model a smoke run builds has that layout and dtype (nothing drops a field on the way).
  cfg = build.build_model(smoke, cls_token_id=1, vocab_size=50).cfg
  assert (cfg.visual, cfg.order, cfg.positions, cfg.dtype, cfg.type_vocab_size) == (
      smoke.model.visual, smoke.model.order, smoke.model.positions, "bfloat16",
      smoke.model.type_vocab_size)
  # Still a smoke run: the demo's tiny model and inputs, 2 steps, generated data.
  assert (smoke.model.hidden_size, smoke.model.num_layers, smoke.total_steps) == (64, 2, 2)
  assert (smoke.max_text_len, smoke.max_regions) == (40, 4)
  assert smoke.dataset.name == "synthetic_scenes" and not smoke.init_from


def test_smoke_variants_differ_where_their_rows_do():
  full = {rel: _signature(_module(rel).get_config()) for rel in PAPER}
  smoke = {rel: _signature(_module(rel).get_config("runlocal")) for rel in PAPER}
  assert smoke == full
  layouts = {}
  for name in ("multi30k_joint", "coco_joint", "flickr30k_joint"):
    m = _module(os.path.join("configs", "paper", f"{name}.py")).get_config("runlocal").model
    layouts[name] = (m.visual, m.order, m.positions, m.type_vocab_size, m.dtype)
  assert layouts == {"multi30k_joint": ("m3p", "image_first", "sequence", 0, "bfloat16"),
                     "coco_joint": ("oscar", "text_first", "text", 2, "bfloat16"),
                     "flickr30k_joint": ("oscar", "text_first", "text", 2, "bfloat16")}
