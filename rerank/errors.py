"""The one error type for a user's mistake, importable from every layer.

Library code raises `UserError` when the input it was given (a flag, a config field, a file or
directory of the user's) is wrong in a way the user can fix; the message names the flag or
file, what was expected and what was found:

  --out 'notes/': expected an empty directory or an index written by rerank.index; found 3 other files

Entry points run under `cli.run`, which prints such an error as one `error:` line and exits 2,
without a traceback (`--debug` or RERANK_DEBUG=1 shows it). Anything else that escapes is a bug
and keeps its traceback. The module imports nothing of the package, so models, data, indexing,
training, inference and evaluation may all raise it.
"""


class UserError(ValueError):
  """A mistake in the user's input, described in one line: where, what was expected, what was found.

  Subclasses ValueError so that callers which caught ValueError before keep working.
  """


def expected(where: str, what: str, found) -> UserError:
  """The usual message: `WHERE: expected WHAT, found FOUND`, e.g. raise errors.expected(...)."""
  return UserError(f"{where}: expected {what}, found {found}")


def entries(names, shown: int = 3) -> str:
  """'1 entry (a.txt)', '5 entries (a, b, c, ...)': what a directory holds, for a message."""
  names = sorted(names)
  listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
  return f"{len(names)} {'entry' if len(names) == 1 else 'entries'} ({listed})"
