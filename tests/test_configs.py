"""Every config file builds, configs import as a package, and each setting has one home."""

import glob
import importlib
import os
import re
import subprocess
import sys

import pytest

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
