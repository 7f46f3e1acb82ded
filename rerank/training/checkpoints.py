"""Orbax checkpoints in a workdir: the newest few for resuming, and the best by dev score.

Layout: `DIR/checkpoints/<step>/` (full train state, the last `keep` steps) and
`DIR/best/<step>/` (parameters only, the single best dev score). Orbax writes each step to a
temporary directory and renames it when complete, so a crash never leaves a half checkpoint
that looks finished; saves are asynchronous, so training continues while they are written.

A run killed mid-save can leave any mix of finished and unfinished steps in the two
directories (say best/3 written, checkpoints/3 still a temp directory). `prepare_resume`, called
by the trainer only (it holds the workdir lock), settles them before training continues.
"""

import orbax.checkpoint as ocp

from rerank import paths


class Checkpoints:
  """The two managers of a workdir."""

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    workdir = paths.path(workdir)  # local (made absolute) or gs://
    # Both managers may save the same step at once (the last step is often a dev-evaluation
    # step too); orbax names its multi-process barriers by step ("_async_write_complete.6"),
    # so each manager needs its own prefix or the second save's barrier collides and times out.
    self.latest = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="latest")))
    self.best = ocp.CheckpointManager(
        workdir / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["dev_score"], best_mode="max",
            enable_async_checkpointing=async_save, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="best")))

  def save(self, step: int, state) -> None:
    self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

  def save_best(self, step: int, params, dev_score: float) -> None:
    self.best.save(step, args=ocp.args.StandardSave({"params": params}),
                   metrics={"dev_score": float(dev_score)}, force=True)

  def prepare_resume(self, log=print, remove_unfinished: bool = True) -> int:
    """The step training resumes from (0 = start), after settling what a kill left behind.

    Unfinished saves (orbax temp directories) are removed, and best checkpoints newer than the
    newest train state are deleted: training re-runs those steps (deterministically) and saves
    them again, which orbax refuses while they exist (StepAlreadyExistsError). Every process
    calls it (deleting is collective); `remove_unfinished` on one of them.
    """
    for manager in (self.latest, self.best):
      pattern = f"*{ocp.path.atomicity.TMP_DIR_SUFFIX}*"
      for tmp in manager.directory.glob(pattern) if remove_unfinished else ():
        tmp.rmtree(missing_ok=True)
        log(f"warning: removed the unfinished checkpoint {tmp} (the run was killed mid-save)")
      manager.reload()
    start = self.latest.latest_step() or 0
    for step in self.best.all_steps():
      if step > start:
        log(f"warning: {self.best.directory}/{step} is newer than the newest train state (step "
            f"{start}); training repeats steps {start + 1}-{step} and saves it again")
        self.best.delete(step)
    return start

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore_state(self, abstract_state, step: int | None = None):
    """The train state at `step` (default newest), laid out like `abstract_state`."""
    step = self.latest.latest_step() if step is None else step
    return self.latest.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_params(self, abstract_state, prefer_best: bool = True):
    """(params, description) from the best checkpoint if any (and preferred), else the newest.

    Returns (None, None) when the workdir holds no checkpoint.
    """
    best_step = self.best.best_step() if prefer_best else None
    if best_step is not None:
      tree = self.best.restore(
          best_step, args=ocp.args.StandardRestore({"params": abstract_state["params"]}))
      return tree["params"], f"best (step {best_step})"
    step = self.latest.latest_step()
    if step is None:
      return None, None
    return self.restore_state(abstract_state, step)["params"], f"latest (step {step})"

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc) -> None:
    """Waits for pending asynchronous saves, then closes both managers."""
    self.wait()
    self.close()
