"""Command-line plumbing shared by the entry points: flags, config, workdir, one-line errors.

Every entry point (`python -m rerank.X`) follows one convention:

  FLAGS = flags.FLAGS

  def define_flags():          # the command's flags; never defined at import time
    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "...")

  def main(argv):              # thin: read FLAGS, call one library function, print
    ...

  if __name__ == "__main__":
    cli.run(main, define_flags)

so every module of the package can be imported in one process without a flag clash, and the
library function under `main` can be called from Python with plain arguments.
"""

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rerank import errors

DEBUG_ENV = "RERANK_DEBUG"


def fail(message: str, code: int = 2):
  """Prints one actionable line to stderr and exits non-zero."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def require(flag_values, *names):
  """fail() on the first of `names` (flags of `flag_values`, e.g. flags.FLAGS) left empty."""
  for name in names:
    if not flag_values[name].value:
      fail(f"--{name} is required")


def define_config_flag():
  return config_flags.DEFINE_config_file(
      "config", None, "Experiment config: configs/NAME.py[:ARGS]; override any field with "
      "--config.FIELD=VALUE.", lock_config=True)


def run(main, define_flags) -> None:
  """Defines the command's flags, then runs `main` under absl with one-line flag errors.

  A `errors.UserError` escaping `main` is printed as one `error:` line with exit code 2; with
  `--debug` or RERANK_DEBUG=1 its traceback is printed first.
  """
  define_flags()
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, f"Print the traceback of a user error too (or set {DEBUG_ENV}=1).")
  app.run(lambda argv: _run_main(main, argv), flags_parser=parse_flags)


def debugging() -> bool:
  """True when the user asked for tracebacks: --debug, or RERANK_DEBUG set to anything but 0."""
  if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
    return True
  return "debug" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.debug


def _run_main(main, argv):
  try:
    return main(argv)
  except errors.UserError as e:
    if debugging():
      traceback.print_exc()
    fail(str(e))


def load_config():
  """The parsed --config; a missing file or a bad override is one error line."""
  try:
    config = flags.FLAGS.config
    config.keys()  # a config file that failed to load raises only on first use
  except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    detail = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f"--config: {detail[-1] if detail else e}")
  if config is None:
    fail("--config is required, e.g. --config=configs/demo.py")
  return config


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
