"""Training modes as one small object: which parameter trees, which heads, which updates.

`config.mode` is a name; `modes.get(config.mode)` resolves it once, and everything after asks
the object (`mode.has_be`, `mode.be_params(params)`, `mode.opt_keys`) instead of comparing
strings. The five modes (docs/DESIGN.md, "Modes"):

  be               one tree, the bi-encoder objective only
  ce               one tree, the cross-encoder objective only
  joint_alternate  one tree, two optimizers: each step a BE update, then a CE update (the authors')
  joint_sum        one tree, one update on be_loss + ce_weight * ce_loss
  separate         two trees {"be", "ce"}, each trained on its own objective, one optimizer each
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mode:
  name: str
  has_be: bool  # the model has a bi-encoder (text / image embeddings)
  has_ce: bool  # the model has a cross-encoder (pair scores)
  separate: bool = False  # two parameter trees, {"be": ..., "ce": ...}
  alternate: bool = False  # one tree, a BE update then a CE update per step

  @property
  def opt_keys(self) -> tuple[str, ...]:
    """Keys of the optimizer-state dict: one optimizer per update of a step."""
    return ("be", "ce") if self.separate or self.alternate else ("main",)

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
