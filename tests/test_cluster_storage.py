"""gs:// workdirs: every write goes through rerank.paths, none makes a local `gs:` directory.

A stand-in for Cloud Storage (etils' mock_epath) maps gs://B/... to a local "bucket" directory.
"""

import contextlib
import json
import os

import pytest
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

from configs import demo
from rerank import paths
from rerank import train
from rerank.evaluation import evaluator
from rerank.training import checkpoints
from rerank.training import metric_writer
from rerank.training import validate

# How many leading arguments of each epath backend function are paths.
_PATH_ARGS = dict(copy=2, exists=1, glob=1, isdir=1, listdir=1, makedirs=1, mkdir=1, open=1,
                  remove=1, rename=2, replace=2, rmtree=1, stat=1, walk=1)


@contextlib.contextmanager
def fake_gcs(root):
  """gs://BUCKET/KEY -> ROOT/BUCKET/KEY for every epath operation; records the gs:// calls."""
  calls = []

  def to_local(p):
    s = os.fspath(p)
    return os.path.join(root, s[len("gs://"):]) if s.startswith("gs://") else s

  def mock(name, n):
    def fn(original, *args, **kwargs):
      if any(os.fspath(a).startswith("gs://") for a in args[:n]):
        calls.append(name)
      return original(*[to_local(a) for a in args[:n]], *args[n:], **kwargs)
    return fn

  with epath_testing.mock_epath(**{name: mock(name, n) for name, n in _PATH_ARGS.items()}):
    yield calls


@pytest.fixture
def cwd(tmp_path, monkeypatch):
  d = tmp_path / "cwd"
  d.mkdir()
  monkeypatch.chdir(d)
  return d


def test_paths_keep_bucket_urls_and_make_local_paths_absolute(cwd):
  assert os.fspath(paths.path("gs://b/run")) == "gs://b/run"
  assert paths.join("gs://b/run", "best", "6") == "gs://b/run/best/6"
  assert os.fspath(paths.path("run")) == os.path.join(str(cwd), "run")
  assert paths.is_remote("gs://b") and not paths.is_remote("/tmp/gs:/b")


def test_local_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
  p = tmp_path / "results.json"
  paths.write_text(p, "old")
  paths.write_text(p, "new")
  assert p.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_gs_workdir_never_creates_a_local_gs_directory(tmp_path, cwd, monkeypatch):
  bucket = tmp_path / "bucket"
  boards = []
  # tensorboardX writes gs:// itself (google-cloud-storage); here it only records where.
  monkeypatch.setattr(metric_writer.tensorboardX, "SummaryWriter",
                      lambda logdir, **_: boards.append(logdir) or _NullBoard())
  # orbax asks the real bucket for its layout (google-cloud-storage); the stand-in has none.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda _: False)
  with fake_gcs(bucket) as calls:
    workdir = "gs://b/run"
    train._make_workdir(workdir)
    paths.write_text(paths.join(workdir, "config.json"),
                     demo.get_config("runlocal").to_json_best_effort())
    with metric_writer.MetricWriter(workdir) as w:
      w.write(2, {"loss": 1.5})
      w.write(4, {"loss": 1.25})
    with metric_writer.MetricWriter(workdir, resume_step=2) as w:  # a resumed run
      w.write(4, {"loss": 1.0})
    evaluator.write_results(workdir, {"dataset": "d", "split": "test", "num_images": 4,
                                        "num_texts": 20, "rows": []})
    with checkpoints.Checkpoints(workdir) as ckpts:
      assert os.fspath(ckpts.latest.directory) == "gs://b/run/checkpoints"
      assert os.fspath(ckpts.best.directory) == "gs://b/run/best"
      assert ckpts.latest_step() is None
    with pytest.raises(validate.ConfigError, match="workdir"):
      train._make_workdir("")

  assert os.listdir(cwd) == []  # no ./gs:/b/run
  run = bucket / "b" / "run"
  assert sorted(os.listdir(run)) == ["best", "checkpoints", "config.json", "metrics.jsonl",
                                     "results.json", "results.md"]
  assert json.loads((run / "config.json").read_text())["total_steps"] == 6
  assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == [
      {"step": 2, "loss": 1.5}, {"step": 4, "loss": 1.0}]
  assert boards == ["gs://b/run/tensorboard"] * 2
  assert {"makedirs", "open", "exists"} <= set(calls)  # all through the stand-in


class _NullBoard:

  def add_scalar(self, *args):
    pass

  def close(self):
    pass
