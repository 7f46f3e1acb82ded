"""Config validation: every shipped config passes; a bad one reports every problem, by field."""

import glob
import importlib
import os
import sys

import pytest

from rerank import train
from rerank.training import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo  # noqa: E402

CONFIG_FILES = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
    if "def get_config" in open(p).read())


def _runlocal(**overrides):
  c = demo.get_config("runlocal")
  with c.unlocked():
    for field, value in overrides.items():
      node = c
      *parents, leaf = field.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


@pytest.mark.parametrize("path", CONFIG_FILES)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_shipped_config_validates(path, arg):
  module = importlib.import_module(path[:-3].replace(os.sep, "."))
  config = module.get_config(arg)
  # The paper configs name weights that only exist where they were converted: files=False.
  files = arg == "runlocal" or "paper" not in path
  for num_devices in (None, 1, 8):
    assert validate.problems(config, num_devices, files=files) == [], (path, arg, num_devices)


@pytest.mark.parametrize("arg", ["runlocal,mode=be,sharding=fsdp", "runlocal,mode=ce,sharding=tp",
                                 "mode=separate,size=base", "runlocal,mode=joint_sum"])
def test_demo_variants_validate(arg):
  assert validate.problems(demo.get_config(arg), num_devices=4) == []


def test_every_problem_is_reported_at_once_with_its_field():
  config = _runlocal(**{"mode": "bogus", "lr": -1.0, "log_every": 0, "eval.k": 0,
                        "loss.ce": "lisstwise", "hard_negatives.ce_prob": 1.5,
                        "dataset.name": "nope", "rules.heads": "tensor"})
  found = validate.problems(config)
  fields = ["mode", "lr", "log_every", "loss.ce", "hard_negatives.ce_prob", "dataset.name",
            "eval.k", "rules.heads"]
  assert len(found) == len(fields), found
  for field in fields:
    line = next(p for p in found if p.startswith(f"config.{field}:"))
    assert "expected" in line and "found" in line, line
  assert "found 'bogus'" in found[0] and "'joint_alternate'" in found[0]
  with pytest.raises(validate.ConfigError) as e:
    validate.check(config)
  assert e.value.problems == found
  assert str(e.value).startswith(f"{len(fields)} config problems: (1) config.mode:")
  assert "\n" not in str(e.value)  # the CLI prints it as one line


@pytest.mark.parametrize("mode,overrides,field,says", [
    ("ce", {"hard_negatives.every": 2}, "hard_negatives.every", "bi-encoder"),
    ("ce", {"hard_negatives.be_negatives": 2}, "hard_negatives.be_negatives", "bi-encoder"),
    ("be", {"hard_negatives.ce_prob": 0.5}, "hard_negatives.ce_prob", "cross-encoder"),
    ("be", {"loss.be": "triplet"}, "loss.be", "['infonce', 'vsepp']"),
    ("joint_sum", {"loss.temperature": 0.0}, "loss.temperature", "> 0"),
    ("joint_sum", {"grad_accum": 3}, "batch_size", "a multiple of grad_accum (3)"),
    ("joint_sum", {"loss.ce": "listwise", "grad_accum": 2, "loss.ce_group.captions": 6},
     "loss.ce_group.captions", "2 x grad_accum = 4"),
    ("joint_sum", {"loss.ce": "listwise", "loss.ce_group.confusers": 8},
     "loss.ce_group.confusers", "[0, loss.ce_group.size - 1 = 7]"),
    ("joint_sum", {"init_from": "/nonexistent"}, "init_from", "not a converted checkpoint"),
])
def test_mode_dependent_and_loss_checks(mode, overrides, field, says):
  config = _runlocal(mode=mode, **overrides)
  found = validate.problems(config)
  assert len(found) == 1 and found[0].startswith(f"config.{field}:") and says in found[0], found


def test_checks_that_do_not_apply_to_the_mode_are_skipped():
  # A CE-only run never reads loss.be; a BE-only run never builds CE groups.
  assert validate.problems(_runlocal(mode="ce", **{"loss.be": "unused"})) == []
  assert validate.problems(_runlocal(mode="be", **{"loss.ce": "listwise",
                                                   "loss.ce_group.size": 1})) == []


@pytest.mark.parametrize("overrides,num_devices,field,says", [
    ({"batch_size": 12}, 8, "batch_size", "a multiple of 8 (batch axis 'data' of mesh "
                                           "{'data': 8, 'model': 1} x grad_accum 1); found 12"),
    ({"batch_size": 8, "grad_accum": 2}, 8, "batch_size", "a multiple of 16"),
    ({"mesh": {"data": -1, "model": 3}}, 8, "mesh", "product (3) divides the 8 devices"),
    ({"mesh": {"data": 2, "model": 2}}, 8, "mesh", "multiply to the 8 devices"),
    ({"mesh": {"data": -1, "model": -1}}, None, "mesh", "at most one -1"),
    ({"rules.batch": "model"}, 8, None, None),  # batch over a size-1 axis: any batch splits
    ({"loss.ce": "listwise", "loss.ce_group.captions": 3, "loss.ce_group.size": 3,
      "loss.ce_group.confusers": 1,
      "batch_size": 8}, 2, "loss.ce_group", "a multiple of 2"),
])
def test_mesh_checks_use_the_device_count(overrides, num_devices, field, says):
  found = validate.problems(_runlocal(**overrides), num_devices)
  if field is None:
    assert found == []
  else:
    assert len(found) == 1 and found[0].startswith(f"config.{field}:") and says in found[0], found


def test_rules_may_be_ordered_pairs_with_several_axes():
  # t5x / maxtext style: (logical, mesh axes) in order. A plain dict config works as well.
  config = demo.get_config("runlocal").to_dict()
  config["mesh"] = {"data": 2, "fsdp": 2, "model": 1}
  config["rules"] = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor")]
  found = validate.problems(config, num_devices=4)
  assert found == ["config.rules.mlp: expected a mesh axis of config.mesh ['data', 'fsdp', "
                   "'model'] or \"\"; found 'tensor'"]
  config["batch_size"] = 6  # the batch splits over data x fsdp = 4 devices
  assert "a multiple of 4 (batch axis 'data x fsdp'" in validate.problems(config, num_devices=4)[-1]


def test_trainer_validates_before_writing_anything(tmp_path):
  workdir = str(tmp_path / "w")
  with pytest.raises(validate.ConfigError) as e:
    train.train_and_evaluate(_runlocal(log_every=0, **{"eval.k": 0}), workdir)
  assert [p.split(":")[0] for p in e.value.problems] == ["config.log_every", "config.eval.k"]
  assert not os.path.exists(workdir)


def test_unwritable_workdir_is_a_config_error(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(validate.ConfigError, match="workdir"):
    train.train_and_evaluate(_runlocal(), str(tmp_path / "file" / "w"))
