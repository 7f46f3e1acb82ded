"""Users' files are safe: bad input is one `error:` line, nothing of theirs is overwritten or half-written.

Each test is a probe of issue 15 (a careless user, an interrupted run): it asserts the exit code,
the message's key words, and that nothing was left behind or changed.
"""

import os
import subprocess
import sys

import pytest

from rerank import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("RERANK_DEBUG", None)
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
