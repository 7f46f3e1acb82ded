"""Training metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX, no TensorFlow).

On resume from step s, logged lines after s are dropped first, so a run that was killed and
restarted leaves one line per logged step, as an uninterrupted run would.
"""

import json
import os

import numpy as np
import tensorboardX


class MetricWriter:
  """Appends one row of scalars per logged step; a no-op on processes other than the main one."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    if resume_step > 0 and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    elif os.path.exists(self.path):
      os.remove(self.path)
    self._file = open(self.path, "a")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                          purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
