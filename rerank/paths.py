"""Files in local directories and in cloud buckets (gs://, s3://) through one path layer.

Workdirs, data dirs, configs, metrics and results may live on local disk or in a bucket that
every host of a slice sees. Every path operation goes through `etils.epath`, the layer orbax and
TFDS already use, so a `gs://bucket/run` stays a bucket path: `os.path.abspath` would turn it
into a local `./gs:/bucket/run` directory.

Writes never leave a half-written file under the final name. Locally: a temporary file in the
same directory, then `os.replace`. In an object store an object becomes visible only when its
upload completes, so the upload itself is the commit (orbax's own step directories add a commit
marker on top of that). Object stores cannot append; callers that log line by line rewrite
the whole object there (rerank/training/metric_writer.py).
This module sits below every layer and imports nothing of the package.
"""

import os
import uuid

from etils import epath


def is_remote(p) -> bool:
  """True for a bucket URL (`gs://...`, `s3://...`), False for a local path."""
  return "://" in os.fspath(p)


def path(p) -> epath.Path:
  """`p` as an epath.Path: a bucket URL as it is, a local path made absolute."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(p))


def join(p, *parts) -> str:
  """`os.path.join` that keeps `gs://` URLs intact."""
  return os.fspath(epath.Path(p).joinpath(*parts)) if is_remote(p) else os.path.join(p, *parts)


def exists(p) -> bool:
  return path(p).exists()


def make_dirs(p) -> None:
  """Creates directory `p` and its parents (a no-op in buckets without directories)."""
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
  return path(p).read_text()


def write_text(p, text: str) -> None:
  """Writes `text` to `p` atomically: readers see the old file or the new one, never a part."""
  p = path(p)
  if is_remote(p):
    p.write_text(text)  # one upload: the object appears only when it is complete
    return
  tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    tmp.write_text(text)
    os.replace(tmp, p)
  finally:
    if tmp.exists():
      tmp.unlink()


def remove(p) -> None:
  """Deletes file `p` if it exists."""
  p = path(p)
  if p.exists():
    p.unlink()


def open_file(p, mode: str = "r"):
  """An open file object for `p` (local or bucket)."""
  return path(p).open(mode)
