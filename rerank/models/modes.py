"""Training modes as one small object: which parameter trees, which heads, which updates.

`config.mode` is a name; `modes.get(config.mode)` resolves it once, and everything after asks
the object (`mode.has_be`, `mode.be_params(params)`, `mode.updates`) instead of comparing
strings. The five modes (docs/DESIGN.md, "Modes"):

  be               one tree, the bi-encoder objective only
  ce               one tree, the cross-encoder objective only
  joint_alternate  one tree, two optimizers: each step a BE update, then a CE update (the authors')
  joint_sum        one tree, one update on be_loss + ce_weight * ce_loss
  separate         two trees {"be", "ce"}, each trained on its own objective, one optimizer each
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Update:
  """One optimizer update of a training step: what it minimises, with which optimizer, on what.

  A step runs its mode's updates in order, each with its own forward/backward pass, gradient
  clipping and optimizer state `state["opt_state"][opt_key]`.
  """

  opt_key: str  # its optimizer state's key: "main" when a step has one update, else "be"/"ce"
  objectives: tuple[str, ...]  # "be" and/or "ce"; both = be_loss + ce_weight * ce_loss
  tree: str | None = None  # the top-level params key it updates ("be"/"ce"); None = all params


@dataclasses.dataclass(frozen=True)
class Mode:
  name: str
  has_be: bool  # the model has a bi-encoder (text / image embeddings)
  has_ce: bool  # the model has a cross-encoder (pair scores)
  separate: bool = False  # two parameter trees, {"be": ..., "ce": ...}
  alternate: bool = False  # one tree, a BE update then a CE update per step

  @property
  def updates(self) -> tuple[Update, ...]:
    """The optimizer updates of one training step, in the order they run."""
    if self.separate:
      return (Update("be", ("be",), tree="be"), Update("ce", ("ce",), tree="ce"))
    if self.alternate:
      return (Update("be", ("be",)), Update("ce", ("ce",)))
    return (Update("main", self.batch_parts),)

  @property
  def opt_keys(self) -> tuple[str, ...]:
    """Keys of the optimizer-state dict: one optimizer per update of a step."""
    return tuple(u.opt_key for u in self.updates)

  @property
  def batch_parts(self) -> tuple[str, ...]:
    """Which parts a training batch has: "be" (captions + their images), "ce" (pairs)."""
    return (("be",) if self.has_be else ()) + (("ce",) if self.has_ce else ())

  @property
  def param_trees(self) -> tuple[str, ...] | None:
    """Top-level keys of the parameter tree for two-tree modes; None for one shared tree."""
    return ("be", "ce") if self.separate else None

  @property
  def model_name(self) -> str:
    """The results table's `model` column: be, ce, separate or joint."""
    return self.name if self.name in ("be", "ce", "separate") else "joint"

  def be_params(self, params):
    """The tree the bi-encoder reads (the "be" tree of a separate model, else all of it)."""
    return params["be"] if self.separate else params

  def ce_params(self, params):
    """The tree the cross-encoder reads (the "ce" tree of a separate model, else all of it)."""
    return params["ce"] if self.separate else params


MODES = {m.name: m for m in (
    Mode("be", has_be=True, has_ce=False),
    Mode("ce", has_be=False, has_ce=True),
    Mode("joint_alternate", has_be=True, has_ce=True, alternate=True),
    Mode("joint_sum", has_be=True, has_ce=True),
    Mode("separate", has_be=True, has_ce=True, separate=True),
)}


def get(mode) -> Mode:
  """The Mode named `mode` (a Mode passes through). Raises ValueError naming the valid ones."""
  if isinstance(mode, Mode):
    return mode
  if mode not in MODES:
    raise ValueError(f"config.mode: expected one of {list(MODES)}; found {mode!r}")
  return MODES[mode]
