"""A training workdir kept safe: only ours is written to, one run at a time, a resume that fits.

`python -m rerank.train --workdir=DIR` writes config.json, metrics.jsonl, checkpoints/, best/,
tensorboard/ and results.* into DIR, and rewrites some of them on resume. Before any of that the
trainer calls, in this order:

  check_destination(DIR)        # DIR is absent, empty, or a workdir of ours (never a user's folder)
  with Lock(DIR, log):          # one run per workdir; a dead run's lock is taken over
    check_resumable(config, DIR)  # the config builds the model DIR's checkpoints hold
    ...
    write_text(DIR/config.json, ...)  # temp file + rename: never half-written

Local directories and gs:// buckets alike (rerank/paths.py), except that a bucket is not locked.

Each problem is an `errors.UserError` of one line, raised before anything of the user's changes.
"""

import json
import os
import socket
import time

from rerank import errors
from rerank import paths

CONFIG = "config.json"
LOCK = "train.lock"
# Everything the trainer writes; a directory holding only these (or our config.json) is ours.
OURS = (CONFIG, LOCK, "metrics.jsonl", "checkpoints", "best", "tensorboard", "results.json",
        "results.md")
# Config fields a resume may change: they do not change the train state's shapes or meaning.
_RUNTIME_MODEL_FIELDS = ("dtype", "remat", "dropout_rate", "attention_dropout_rate", "head_dropout")
# Config fields (besides model.*) that fix what the checkpoints hold: the state tree, the vocab.
_IDENTITY_FIELDS = ("mode", "dataset.name", "dataset.tokenizer", "dataset.language")


def check_destination(workdir: str, flag: str = "--workdir") -> None:
  """Raises UserError unless `workdir` is absent, an empty directory or a training workdir of ours.

  Ours: its config.json is a training config, or it holds nothing but files the trainer writes
  (a run killed before its config.json). A user's folder, `.` or a converted checkpoint (whose
  config.json is no training config) is refused: the trainer would overwrite and delete in it.
  """
  p = paths.path(workdir)
  if not p.exists():
    return
  if not p.is_dir():
    raise errors.expected(f"{flag} {workdir!r}", "a directory", "a file")
  entries = sorted(e.name for e in p.iterdir())
  if _is_training_config(paths.join(workdir, CONFIG)):
    return
  # config.json is not ours here (checked above): a converted checkpoint's, say.
  others = [e for e in entries if e == CONFIG or (e not in OURS and not _is_our_temp(e))]
  if others:
    raise errors.expected(f"{flag} {workdir!r}", "an empty directory or a rerank.train workdir",
                          f"{errors.entries(others)}; choose another {flag}")


def _is_training_config(path: str) -> bool:
  try:
    saved = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return False
  return isinstance(saved, dict) and {"mode", "model", "total_steps"} <= set(saved)


def _is_our_temp(name: str) -> bool:
  """Temp files our writers leave only when killed mid-write: `.NAME.*.tmp`; the workdir probes
  `.write_test.*` that other processes of the same run write while this one checks (and their
  own temp files, `..write_test.*.tmp`)."""
  return (any(name.startswith(f".{o}.") for o in OURS)
          or name.lstrip(".").startswith("write_test."))


def check_resumable(config, workdir: str) -> None:
  """Raises UserError when `workdir` holds checkpoints of another model than `config` builds.

  Compares the saved config.json's model, mode and vocabulary fields with `config`'s, so a
  resume with another model size fails in one line, before config.json is rewritten.
  """
  path = paths.join(workdir, CONFIG)
  if not paths.exists(path) or not _has_checkpoints(workdir):
    return  # nothing trained yet: any config may start here
  try:
    saved = _flat(json.loads(paths.read_text(path)))
  except (OSError, ValueError) as e:
    raise errors.expected(path, "the JSON config of the run that wrote the checkpoints",
                          f"unreadable JSON ({e})") from e
  asked = _flat(json.loads(config.to_json_best_effort()))
  fields = [k for k in sorted(set(saved) | set(asked)) if k in _IDENTITY_FIELDS or (
      k.startswith("model.") and k.split(".", 1)[1] not in _RUNTIME_MODEL_FIELDS)]
  differ = [k for k in fields if saved.get(k) != asked.get(k)]
  if differ:
    said = "; ".join(f"{k} {saved.get(k)!r}, the config asks for {asked.get(k)!r}" for k in differ)
    raise errors.UserError(
        f"--workdir {workdir!r}: this workdir was trained with {said}; resume with the same "
        "model, or train in a new --workdir")


def _has_checkpoints(workdir: str) -> bool:
  for sub in ("checkpoints", "best"):
    d = paths.path(workdir) / sub
    if d.is_dir() and any(e.name.isdigit() for e in d.iterdir()):
      return True
  return False


def _flat(tree, prefix: str = "") -> dict:
  """{"model.hidden_size": 64, ...} from nested dicts."""
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}."))
  return out


def write_text(path: str, text: str) -> None:
  """paths.write_text (temp file + rename), a failure as a UserError saying `path` is unchanged.

  A failed write (disk full, read-only) leaves `path` as it was and no temp file behind.
  """
  try:
    paths.write_text(path, text)
  except OSError as e:
    raise errors.UserError(f"{path}: cannot write it ({e.strerror or e}); it is unchanged") from e


class Lock:
  """workdir/train.lock, holding the owner's pid and host, while a run trains in `workdir`.

  A second run on the same workdir fails with one line naming the owner. A lock whose owner
  died (same host, pid gone or reused) is taken over with a warning, so kill -9 never leaves a
  workdir locked for good. Only the main process of a multi-process job takes it; a bucket
  workdir (gs://) is not locked, as object stores have no exclusive create.
  """

  def __init__(self, workdir: str, log=print, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK)
    self.log, self.enabled = log, enabled and not paths.is_remote(workdir)
    self.me = {"pid": os.getpid(), "host": socket.gethostname(),
               "started": _process_start(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

  def __enter__(self) -> "Lock":
    if not self.enabled:
      return self
    for _ in range(3):  # a stale lock taken over by another run meanwhile: look again
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      except OSError as e:
        raise errors.UserError(f"{self.path}: cannot create the workdir lock "
                               f"({e.strerror or e})") from e
      with os.fdopen(fd, "w") as f:
        json.dump(self.me, f)
      return self
    raise errors.UserError(f"{self.path}: could not take the workdir lock; another run keeps "
                           "taking it")

  def _take_over_if_stale(self) -> None:
    owner = _read_owner(self.path)
    if owner is None:
      return  # removed meanwhile, or being written this instant: try again
    if not _is_dead(owner):
      raise errors.UserError(
          f"--workdir {os.path.dirname(self.path)!r}: expected no other run in it, found the run "
          f"of pid {owner.get('pid')} on host {owner.get('host')!r} (since {owner.get('since')}); "
          f"wait for it to end, or if it is gone delete {self.path}")
    aside = f"{self.path}.stale-{os.getpid()}"
    try:
      os.rename(self.path, aside)  # atomic: of two runs taking over, one wins
    except FileNotFoundError:
      return
    os.remove(aside)
    self.log(f"warning: took over the lock of pid {owner.get('pid')} on host "
             f"{owner.get('host')!r}, which is no longer running ({self.path})")

  def __exit__(self, *exc) -> None:
    if self.enabled and _read_owner(self.path) == self.me:
      os.remove(self.path)


def _read_owner(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      owner = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    # Torn: the owner was killed between creating and writing it, or writes it right now.
    if time.time() - os.path.getmtime(path) < 10:
      return None
    return {"pid": None, "host": socket.gethostname()}
  return owner if isinstance(owner, dict) else {"pid": None, "host": socket.gethostname()}


def _is_dead(owner: dict) -> bool:
  """True when `owner` ran on this host and is gone (its pid is free or now another process)."""
  if owner.get("host") != socket.gethostname():
    return False  # another host's run: cannot tell, so it holds the lock
  pid = owner.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # alive, another user's
  started = owner.get("started")
  return started is not None and started != _process_start(pid)


def _process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None
