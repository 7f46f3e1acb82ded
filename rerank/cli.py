"""Command-line plumbing shared by the entry points: config flag, workdir, one-line errors."""

import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags


def fail(message: str, code: int = 2):
  """Prints one actionable line to stderr and exits non-zero."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def require(flag_values, *names):
  """fail() on the first of `names` (keys of a dict of absl flag holders) left empty."""
  for name in names:
    if not flag_values[name].value:
      fail(f"--{name} is required")


def define_config_flag():
  return config_flags.DEFINE_config_file(
      "config", None, "Experiment config: configs/NAME.py[:ARGS]; override any field with "
      "--config.FIELD=VALUE.", lock_config=True)


def load_config(config_flag):
  """The parsed config; a missing file or a bad override becomes one error line."""
  try:
    config = config_flag.value
    config.keys()  # a config file that failed to load raises only on first use
  except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    detail = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f"--config: {detail[-1] if detail else e}")
  if config is None:
    fail("--config is required, e.g. --config=configs/demo.py")
  return config


def make_workdir(path: str | None) -> str:
  if not path:
    fail("--workdir is required, e.g. --workdir=workdirs/demo")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{os.getpid()}")  # several processes may probe at once
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    fail(f"cannot create or write workdir {path!r}: {e.strerror or e}")
  return path


def quiet_library_logs():
  """Orbax logs every checkpoint event at INFO through absl; keep the console for progress."""
  logging.set_verbosity(logging.WARNING)


def parse_flags(argv):
  """absl flag parser that turns config-file and override errors into one `error:` line.

  Pass as `app.run(main, flags_parser=cli.parse_flags)`.
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    detail = [line.strip() for line in str(e).splitlines() if line.strip()]
    last = detail[-1] if detail else type(e).__name__
    overrides = [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]
    unknown = [o for o in overrides if o.rsplit(".", 1)[-1].strip("'\"") in last]
    if isinstance(e, (AttributeError, KeyError)) and unknown:
      fail(f"--{unknown[0]}: no such config field; see the config file for the valid ones")
    fail(f"bad flags: {last}")
