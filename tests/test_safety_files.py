"""Users' files are safe: bad input is one `error:` line, nothing of theirs is overwritten or half-written.

Each test is a probe of issue 15 (a careless user, an interrupted run): it asserts the exit code,
the message's key words, and that nothing was left behind or changed.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from rerank import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from step_worker import JAX_CACHE  # noqa: E402  (the shared compilation cache)


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **JAX_CACHE)
  env.pop("RERANK_DEBUG", None)
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def _run(args, cwd=ROOT, **env):
  return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True,
                        text=True, check=False, timeout=600)


# --- cli.run: one line for a user's mistake ------------------------------------------------------

_RAISER = ("from absl import flags\n"
           "from rerank import cli, errors\n"
           "def define_flags():\n"
           "  flags.DEFINE_string('thing', 'x', 'a flag')\n"
           "def main(argv):\n"
           "  raise errors.expected('--thing', 'a number', repr(flags.FLAGS.thing))\n"
           "cli.run(main, define_flags)\n")


def test_user_error_is_one_line_and_exit_2(tmp_path):
  res = _run(["-c", _RAISER, "--thing=abc"], cwd=tmp_path)
  assert res.returncode == 2
  assert res.stderr.strip() == "error: --thing: expected a number, found 'abc'"
  assert "Traceback" not in res.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
  args, env = (["--debug"], {}) if how == "flag" else ([], {"RERANK_DEBUG": "1"})
  res = _run(["-c", _RAISER, "--thing=abc", *args], cwd=tmp_path, **env)
  assert res.returncode == 2
  assert "Traceback" in res.stderr and "rerank.errors.UserError" in res.stderr
  assert res.stderr.strip().splitlines()[-1] == "error: --thing: expected a number, found 'abc'"


def test_existing_error_types_are_user_errors():
  from rerank.data.sources import common
  from rerank.indexing import indexes
  from rerank.models import pretrained
  from rerank.training import validate
  for t in (common.BadInput, pretrained.ConvertError, indexes.IndexMismatchError,
            validate.ConfigError):
    assert issubclass(t, errors.UserError) and issubclass(t, ValueError), t


# --- fixtures: a trained workdir, snapshots of directories ----------------------------------------

_TRAIN = ["-m", "rerank.train", "--config=configs/demo.py:runlocal"]


def _snapshot(path) -> dict:
  """relative path -> bytes of every file under `path` (and "<dir>" for directories)."""
  out = {}
  for dirpath, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(dirpath, d), path)] = "<dir>"
    for f in files:
      full = os.path.join(dirpath, f)
      with open(full, "rb") as fh:
        out[os.path.relpath(full, path)] = fh.read()
  return out


def _steps(workdir, sub):
  d = os.path.join(workdir, sub)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _leftovers(workdir):
  """Temp files and directories a clean run never leaves."""
  found = []
  for dirpath, dirs, files in os.walk(workdir):
    found += [os.path.join(dirpath, n) for n in dirs + files
              if "tmp" in n or n.startswith(".") or n == "train.lock"]
  return found


def _metric_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A runlocal workdir stopped after step 3: checkpoints/3 and best/3 (dev score), metrics 2, 3."""
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  res = _run([*_TRAIN, f"--workdir={workdir}", "--stop_after=3"])
  assert res.returncode == 0, res.stderr[-3000:]
  assert _steps(workdir, "checkpoints") == [3] and _steps(workdir, "best") == [3]
  assert _metric_steps(workdir) == [2, 3] and not _leftovers(workdir)
  return workdir


def _copy(trained, tmp_path, name="w"):
  dst = str(tmp_path / name)
  shutil.copytree(trained, dst)
  return dst


def _error_line(res):
  assert res.returncode == 2, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
  assert lines[-1].startswith("error: "), res.stderr[-3000:]
  return lines[-1]


# --- commands that write a directory refuse one that is not theirs ---------------------------------

def _notes(tmp_path):
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "todo.txt").write_text("my notes\n")
  (notes / "sub").mkdir()
  return str(notes)


def _converted_like(tmp_path):
  """A Hugging Face style checkpoint folder: its config.json is no training config."""
  d = tmp_path / "bert"
  d.mkdir()
  (d / "config.json").write_text('{"hidden_size": 768, "num_hidden_layers": 12}\n')
  (d / "vocab.txt").write_text("[PAD]\n")
  return str(d)


@pytest.mark.parametrize("make,found", [(_notes, "2 entries (sub, todo.txt)"),
                                        (_converted_like, "2 entries (config.json, vocab.txt)")])
def test_train_refuses_a_folder_that_is_not_a_workdir(tmp_path, make, found):
  folder = make(tmp_path)
  before = _snapshot(folder)
  line = _error_line(_run([*_TRAIN, f"--workdir={folder}"]))
  assert "expected an empty directory or a rerank.train workdir" in line and found in line, line
  assert _snapshot(folder) == before


@pytest.mark.parametrize("target", ["notes", "dot", "workdir", "file"])
def test_index_refuses_an_out_that_is_not_an_index(tmp_path, trained, target):
  cwd = tmp_path
  if target == "notes":
    out = _notes(tmp_path)
  elif target == "dot":  # `--out=.` run from a folder of notes
    cwd, out = _notes(tmp_path), "."
  elif target == "workdir":
    out = _copy(trained, tmp_path, "workdir")
  else:
    out = str(tmp_path / "file.txt")
    (tmp_path / "file.txt").write_text("keep me\n")
  before = _snapshot(tmp_path)
  line = _error_line(_run(["-m", "rerank.index", f"--checkpoint={trained}", f"--out={out}",
                           "--num_images=8"], cwd=cwd))
  assert line.startswith(f"error: --out {out!r}: expected "), line
  assert ("a file" if target == "file" else "an empty directory or an index") in line
  assert _snapshot(tmp_path) == before


def test_index_overwrite_replaces_only_an_index(tmp_path, trained):
  out = str(tmp_path / "idx")
  res = _run(["-m", "rerank.index", f"--checkpoint={trained}", f"--out={out}", "--num_images=8"])
  assert res.returncode == 0, res.stderr[-3000:]
  first = _snapshot(out)
  assert "index.json" in first
  line = _error_line(_run(["-m", "rerank.index", f"--checkpoint={trained}", f"--out={out}",
                           "--num_images=4"]))
  assert "an index already; pass --overwrite" in line
  assert _snapshot(out) == first
  res = _run(["-m", "rerank.index", f"--checkpoint={trained}", f"--out={out}", "--num_images=4",
              "--overwrite"])
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(out, "index.json")) as f:
    assert json.load(f)["identity"]["num_images"] == 4
  assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temp directory left beside it


def test_index_write_error_leaves_nothing(tmp_path, trained, monkeypatch):
  from rerank import index
  from rerank.indexing import indexes
  calls = []

  def full(*args, **kwargs):
    calls.append(args[0])
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(indexes.np, "save", full)
  out = str(tmp_path / "idx")
  with pytest.raises(errors.UserError) as e:
    index.build_index(trained, out, num_images=8, log=lambda *a, **k: None)
  assert str(e.value) == f"--out {out!r}: cannot write the index (No space left on device); nothing was written"
  assert calls and os.listdir(tmp_path) == []  # the write failed; no index, no temp dir


@pytest.mark.parametrize("existing,found", [("notes.txt", "a file that is no .npy array"),
                                            ("old.npy", "an existing one; pass --overwrite")])
def test_encode_refuses_to_replace_a_file(tmp_path, trained, existing, found):
  import numpy as np
  texts = tmp_path / "t.txt"
  texts.write_text("a red cube\n")
  out = tmp_path / existing
  if existing.endswith(".npy"):
    np.save(out, np.zeros(3))
  else:
    out.write_text("keep me\n")
  before = _snapshot(tmp_path)
  line = _error_line(_run(["-m", "rerank.encode", f"--checkpoint={trained}", f"--texts={texts}",
                           f"--out={out}"]))
  assert f"--out {str(out)!r}: expected a new .npy file, found {found}" in line, line
  assert _snapshot(tmp_path) == before


# --- resume after a kill: any mix of finished and unfinished saves ---------------------------------

_TMP = ".orbax-checkpoint-tmp-1796043524"  # what orbax names a step it is still writing


def _unfinish(workdir, sub, step):
  """Turns a finished step back into the temp directory of a save still in progress."""
  path = os.path.join(workdir, sub, str(step))
  os.remove(os.path.join(path, "commit_success.txt"))
  os.rename(path, path + _TMP)


def _kill_during_latest_save(w):  # the case: best/3 written, checkpoints/3 not yet
  _unfinish(w, "checkpoints", 3)


def _kill_during_best_save(w):
  _unfinish(w, "best", 3)


def _kill_during_both(w):
  _unfinish(w, "checkpoints", 3)
  _unfinish(w, "best", 3)


def _no_markers(w):  # orbax's commit marker and step metadata gone from a renamed (finished) step
  for sub in ("checkpoints", "best"):
    os.remove(os.path.join(w, sub, "3", "commit_success.txt"))
    os.remove(os.path.join(w, sub, "3", "_CHECKPOINT_METADATA"))


def _stray_temp_of_a_later_step(w):
  shutil.copytree(os.path.join(w, "checkpoints", "3"), os.path.join(w, "checkpoints", "6" + _TMP))


def _best_newer_than_latest(w):  # killed after best/4 was written, before checkpoints/4
  shutil.copytree(os.path.join(w, "best", "3"), os.path.join(w, "best", "4"))


# case -> (damage, rerun's flags, the step it resumes from, checkpoints/ after it, best/ after it:
# a list of the possible ones, since best/ keeps the better dev score of two)
_KILLS = {
    "latest_unfinished": (_kill_during_latest_save, ["--stop_after=3"], 0, [3], [[3]]),
    "best_unfinished": (_kill_during_best_save, ["--stop_after=1"], 3, [3, 4], [[]]),
    "both_unfinished": (_kill_during_both, ["--stop_after=3"], 0, [3], [[3]]),
    "markers_removed": (_no_markers, ["--stop_after=1"], 3, [3, 4], [[3]]),
    "stray_temp": (_stray_temp_of_a_later_step, ["--stop_after=1"], 3, [3, 4], [[3]]),
    "best_newer": (_best_newer_than_latest, ["--stop_after=1", "--config.eval_every=4"], 3,
                   [3, 4], [[3], [4]]),
}


@pytest.mark.parametrize("case", sorted(_KILLS))
def test_rerun_after_a_kill_mid_save_resumes(tmp_path, trained, case):
  damage, flags, start, latest, best = _KILLS[case]
  w = _copy(trained, tmp_path)
  damage(w)
  res = _run([*_TRAIN, f"--workdir={w}", *flags])
  assert res.returncode == 0, res.stderr[-3000:]
  assert ("resumed from" in res.stdout) == bool(start), res.stdout
  if start:
    assert f"at step {start}" in res.stdout
  assert _steps(w, "checkpoints") == latest and _steps(w, "best") in best
  assert not _leftovers(w), _leftovers(w)
  logged = [2, 3, 4] if latest[-1] == 4 else [2, 3]
  assert _metric_steps(w) == logged  # one line per logged step, as an uninterrupted run
