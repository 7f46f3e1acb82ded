"""Training metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX, no TensorFlow).

On resume from step s, logged lines after s are dropped first, so a run that was killed and
restarted leaves one line per logged step, as an uninterrupted run would. A final line torn by
a kill mid-write is dropped with a warning; a damaged line before it is an error naming it.
The workdir may be local or a gs:// bucket (rerank/paths.py); buckets cannot append, so there
the file is rewritten whole at each logged step.
"""

import json

from absl import logging
import numpy as np
import tensorboardX

from rerank import errors
from rerank import paths


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; a torn final line (a kill mid-write) is dropped with a warning.

  Raises errors.UserError naming the line when one before the last is not a row of ours.
  """
  lines = paths.read_text(path).splitlines(keepends=True)
  rows = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
        raise ValueError("no integer step")
    except ValueError as e:
      if i == len(lines) and not line.endswith("\n"):
        logging.warning("%s:%d: dropped a torn last line (the run was killed while writing it)",
                        path, i)
        continue
      raise errors.expected(f"{path}:{i}", "a JSON object with an integer step",
                            f"{line.strip()[:80]!r} ({e})") from e
    rows.append(row)
  return rows


class MetricWriter:
  """Appends one row of scalars per logged step; a no-op on processes other than the main one."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = paths.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    self._lines = []  # every line, for buckets (rewritten whole); unused locally
    if resume_step > 0 and paths.exists(self.path):
      self._lines = [json.dumps(row) + "\n" for row in read_rows(self.path)
                     if row["step"] <= resume_step]
      paths.write_text(self.path, "".join(self._lines))
    else:
      paths.remove(self.path)
    self._file = None if paths.is_remote(self.path) else open(self.path, "a")
    self._tb = tensorboardX.SummaryWriter(paths.join(workdir, "tensorboard"),
                                          purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    if self._file is None:
      self._lines.append(json.dumps(row) + "\n")
      paths.write_text(self.path, "".join(self._lines))
    else:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      if self._file is not None:
        self._file.close()
      self._tb.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
