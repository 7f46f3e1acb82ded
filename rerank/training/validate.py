"""Checks a training config once, up front, and reports every problem it finds at once.

The trainer used to stop at the first bad field it happened to reach, some of them minutes in
(after loading data, or inside the first jitted step). `problems(config)` instead walks every
field the trainer reads and returns one line per problem, each naming the field, what was
expected and what was found:

  config.loss.be: expected one of ['infonce', 'vsepp']; found 'vse'

`check(config, num_devices)` raises them all together as one `ConfigError`; the trainer calls it
before it reads data, builds the model or writes anything to the workdir. Checks that need the
device count (the mesh, batch sizes that must split over its batch axis) run when `num_devices`
is given; the check that reads the disk (`init_from`) unless `files=False`.
"""

import dataclasses
import math
from numbers import Number

from rerank import errors
from rerank.data import datasets
from rerank.data import images
from rerank.data import prepared
from rerank.indexing import indexes
from rerank.indexing import ranking
from rerank.models import build
from rerank.models import modes
from rerank.models import pixels
from rerank.models import pretrained
from rerank.training import losses
from rerank.training import sharding

CE_LOSSES = ("pairwise", "listwise")
_MISSING = object()


class ConfigError(errors.UserError):
  """A run that cannot start: a bad config or workdir. `problems` holds one line per problem."""

  def __init__(self, problems):
    self.problems = [problems] if isinstance(problems, str) else list(problems)
    if len(self.problems) == 1:
      message = self.problems[0]
    else:
      message = f"{len(self.problems)} config problems: " + "; ".join(
          f"({i}) {p}" for i, p in enumerate(self.problems, 1))
    super().__init__(message)


def check(config, num_devices: int | None = None, files: bool = True) -> None:
  """Raises ConfigError listing every problem of `config` (see `problems`); else returns None."""
  found = problems(config, num_devices, files)
  if found:
    raise ConfigError(found)


def problems(config, num_devices: int | None = None, files: bool = True) -> list[str]:
  """Every problem of a training config, one line each: "config.FIELD: expected X; found Y".

  Args:
    config: the run's ConfigDict (the fields of configs/demo.py).
    num_devices: the devices the run will use (all processes); None skips the mesh-size and
      batch-split checks that need it.
    files: False skips checks that read the disk (`init_from` is a converted checkpoint), to
      check a config on a machine without its weights.
  Returns:
    The problems, in field order; empty when the config can run.
  """
  c = _Checker(config)
  mode = _mode(c)
  _optimization(c)
  _losses(c, mode)
  _hard_negatives(c, mode)
  _data_and_eval(c, files)
  _pixel_family(c, files)
  _mesh(c, mode, num_devices)
  return c.found


class _Checker:
  """Reads fields by dotted name and records problems in one format."""

  def __init__(self, config):
    self.config, self.found = config, []

  def get(self, field: str, default=_MISSING):
    node = self.config
    for key in field.split("."):
      try:
        node = node[key]
      except (KeyError, TypeError, AttributeError):
        return default
    return node

  def problem(self, field: str, expected: str, found) -> None:
    found = "nothing (the field is missing)" if found is _MISSING else repr(found)
    self.found.append(f"config.{field}: expected {expected}; found {found}")

  def integer(self, field: str, low: int, default=_MISSING):
    """The field if it is an int >= low, else records a problem and returns None."""
    value = self.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      self.problem(field, f"an integer >= {low}", value)
      return None
    return value

  def number(self, field: str, low: float, default=_MISSING, strict: bool = False,
             high: float | None = None):
    """The field if it is a finite number >= low (> low if strict, <= high), else None."""
    value = self.get(field, default)
    ok = (isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if strict else value >= low) and (high is None or value <= high))
    if not ok:
      span = f"> {low}" if strict else f">= {low}"
      self.problem(field, f"a number {span}" + (f" and <= {high}" if high is not None else ""),
                   value)
      return None
    return value

  def choice(self, field: str, options, default=_MISSING):
    value = self.get(field, default)
    if value not in options:
      self.problem(field, f"one of {list(options)}", value)
      return None
    return value


def _mode(c: _Checker) -> modes.Mode | None:
  """The Mode of config.mode, or None (recorded) when the name is unknown."""
  name = c.get("mode")
  if isinstance(name, str) and name in modes.MODES:
    return modes.get(name)
  c.problem("mode", f"one of {list(modes.MODES)}", name)
  return None


def _optimization(c: _Checker) -> None:
  batch = c.integer("batch_size", 1)
  accum = c.integer("grad_accum", 1, default=1)
  if batch and accum and batch % accum:
    c.problem("batch_size", f"a multiple of grad_accum ({accum}), which splits each step's batch "
              "into equal micro-batches", batch)
  c.integer("total_steps", 1)
  c.integer("warmup_steps", 0)
  c.number("lr", 0.0)
  c.number("weight_decay", 0.0)
  c.number("adam_eps", 0.0, strict=True)
  c.number("clip_norm", 0.0, strict=True)
  c.integer("log_every", 1)
  c.integer("checkpoint_every", 1)
  c.integer("keep_checkpoints", 1)
  c.integer("eval_every", 0)  # 0 = no dev evaluation


def _losses(c: _Checker, mode: modes.Mode | None) -> None:
  if mode is None or mode.has_be:
    be = c.choice("loss.be", sorted(losses.BE_LOSSES))
    if be == "infonce":
      c.number("loss.temperature", 0.0, strict=True)  # logits are cosine / temperature
  ce = c.choice("loss.ce", CE_LOSSES, default="pairwise")
  if ce == "listwise" and (mode is None or mode.has_ce):
    captions = c.integer("loss.ce_group.captions", 1)
    size = c.integer("loss.ce_group.size", 2)  # the positive and at least one negative
    confusers = c.get("loss.ce_group.confusers", 0)
    if size and (isinstance(confusers, bool) or not isinstance(confusers, int)
                 or not 0 <= confusers < size):
      c.problem("loss.ce_group.confusers",
                f"an integer in [0, loss.ce_group.size - 1 = {size - 1}]", confusers)
    accum = c.get("grad_accum", 1)
    if captions and isinstance(accum, int) and accum > 1 and captions % (2 * accum):
      # Micro-batches split the CE rows in halves and then in grad_accum parts (steps.py);
      # only whole groups keep their positive first.
      c.problem("loss.ce_group.captions", f"a multiple of 2 x grad_accum = {2 * accum}, so that "
                "every micro-batch holds whole groups", captions)


def _hard_negatives(c: _Checker, mode: modes.Mode | None) -> None:
  every = c.integer("hard_negatives.every", 0)
  c.integer("hard_negatives.start", 0)
  if every:
    c.integer("hard_negatives.top", 1)
    if mode is not None and not mode.has_be:
      c.problem("hard_negatives.every", f"0, since mining needs a bi-encoder and mode "
                f"{mode.name!r} has none", every)
  c.choice("hard_negatives.index", ("",) + tuple(indexes.BACKENDS), default="")
  c.number("hard_negatives.temperature", 0.0, default=0.0)
  ce_prob = c.number("hard_negatives.ce_prob", 0.0, high=1.0)
  if ce_prob and mode is not None and not mode.has_ce:
    c.problem("hard_negatives.ce_prob", f"0, since mined CE negatives need a cross-encoder and "
              f"mode {mode.name!r} has none", ce_prob)
  c.number("hard_negatives.confuser_prob", 0.0, default=0.0, high=1.0)
  be_negatives = c.integer("hard_negatives.be_negatives", 0, default=0)
  if be_negatives and mode is not None and not mode.has_be:
    c.problem("hard_negatives.be_negatives", f"0, since they feed a bi-encoder loss and mode "
              f"{mode.name!r} has none", be_negatives)


def _data_and_eval(c: _Checker, files: bool) -> None:
  init_from = c.get("init_from", "")
  if init_from and files and not pretrained.is_converted(init_from):
    c.found.append(
        f"config.init_from: expected a converted checkpoint (make one with python -m "
        f"rerank.convert --family=... --src=... --dst=DIR); found {init_from!r}: not a converted "
        f"checkpoint (no model.json and params/)")
  name = c.get("dataset.name")
  if c.get("dataset.data_dir", "") and c.get("model.family", "regions") in ("vilt", "blip"):
    pass  # any name prepared with --source=karpathy; the reader says if it is not there
  elif c.get("dataset.data_dir", ""):
    c.choice("dataset.name", sorted(prepared.SOURCES))
  elif name not in datasets.LOADERS:
    c.problem("dataset.name", f"one of {sorted(datasets.LOADERS)}, or a prepared dataset "
              "with config.dataset.data_dir set (python -m rerank.data.prepare)", name)
  for n in ("num_train_images", "num_dev_images", "num_test_images"):
    c.integer(f"dataset.{n}", 0)  # 0 = the whole split
  c.integer("max_text_len", 1)
  c.integer("max_regions", 1)
  c.integer("eval.k", 1)
  c.integer("eval.batch_size", 1)
  for n in ("ce_queries_t2i", "ce_queries_i2t", "rr_queries_t2i", "rr_queries_i2t"):
    c.integer(f"eval.{n}", 0, default=0)  # 0 = every query
  for d in ("t2i", "i2t"):
    c.integer(f"eval.dev_ce_queries_{d}", -1, default=-1)  # -1 = as eval.ce_queries_*
  c.integer("eval.part_pairs", 1, default=1 << 17)
  c.choice("eval.index", indexes.BACKENDS, default="exact")
  # RR's order inside the top k (rerank.indexing.ranking.fuse); absent = the CE alone.
  c.choice("eval.fusion", ranking.FUSIONS + tuple(ranking.FUSION_ALIASES), default="standard")
  c.number("eval.fusion_weight", 0.0, default=0.0, high=1.0)
  split = c.get("eval.split")
  if not isinstance(split, str) or not split:
    c.problem("eval.split", "a split name such as 'test'", split)


def _pixel_family(c: _Checker, files: bool) -> None:
  """config.model.family; for a pixel family also config.image, the family's model fields and
  whether the two agree on the image geometry and the text length."""
  family = c.get("model.family", pixels.REGIONS) or pixels.REGIONS
  if family == pixels.REGIONS:
    return
  if family not in pixels.FAMILIES:
    c.problem("model.family", f"one of {[pixels.REGIONS, *pixels.FAMILIES]}", family)
    return
  spec = None
  if c.get("image") is _MISSING:
    c.problem("image", f"the {family} image preprocessing, e.g. dict(kind={family!r}, size=384)",
              _MISSING)
  else:
    try:
      spec = images.ImageSpec.from_dict(c.get("image"))
    except ValueError as e:  # errors.UserError naming config.image.FIELD
      c.found.append(str(e))
  if spec is not None and spec.kind != family:
    c.problem("image.kind", f"{family!r} (the preprocessing of config.model.family)", spec.kind)
  lib = pixels.module(family)
  model = c.get("model")
  model = model.to_dict() if hasattr(model, "to_dict") else dict(model)  # ConfigDict or dict
  fields = {k: v for k, v in model.items() if k not in ("family", "head_dropout")}
  init_from = c.get("init_from", "")
  if init_from:  # the sizes come from the checkpoint; without the files they are unknown
    if not (files and pretrained.is_converted(init_from)):
      return
    runtime = build._RUNTIME_FIELDS  # pylint: disable=protected-access
    fields = {**pretrained.read_meta(init_from).get("model", {}),
              **{k: v for k, v in fields.items() if k in runtime}}
  try:
    lib.Config.from_dict({"vocab_size": 1, **fields})
  except (TypeError, ValueError) as e:  # the message names model.FIELD
    c.found.append(f"config.{e}" if str(e).startswith("model.") else f"config.model: {e}")
  # Geometry from the fields as given (the family's defaults for the rest), bad ones or not.
  given = {f.name: f.default for f in dataclasses.fields(lib.Config)}
  given.update(fields)
  if family == "vilt":
    want, where = (given["max_image_height"], given["max_image_width"]), \
        "max_image_height x max_image_width"
  else:
    want, where = (given["image_size"], given["image_size"]), "image_size"
  if spec is not None and spec.canvas != want:  # the model is built for one input shape
    c.problem("image", f"preprocessing onto the model's {want[0]} x {want[1]} image input "
              f"(config.model.{where})", f"{spec.canvas[0]} x {spec.canvas[1]}")
  text_len, positions = c.get("max_text_len", None), given["max_position_embeddings"]
  if isinstance(text_len, int) and isinstance(positions, int) and text_len > positions:
    c.problem("max_text_len", f"at most the model's {positions} text positions "
              "(config.model.max_position_embeddings)", text_len)


def _mesh(c: _Checker, mode: modes.Mode | None, num_devices: int | None) -> None:
  """config.mesh and config.rules; with num_devices, also how the batch splits over the mesh."""
  mesh, rules = c.get("mesh"), c.get("rules")
  try:
    sizes = {str(k): mesh[k] for k in mesh.keys()}
  except (AttributeError, TypeError, KeyError):
    c.problem("mesh", "a mapping of mesh axis name -> size, e.g. {'data': -1, 'model': 1}", mesh)
    return
  try:
    rules = _rule_items(rules)
  except (AttributeError, TypeError, ValueError):
    c.problem("rules", "a mapping of logical axis -> mesh axis name(s)", rules)
    return
  names = list(sizes)
  try:
    sharding.mesh_sizes(sizes)
  except ValueError as e:
    c.found.append(str(e))
    sizes = None
  unknown = sorted({logical for logical, _ in rules} - set(sharding.LOGICAL_AXES))
  if unknown:
    c.problem("rules", f"logical axes among {list(sharding.LOGICAL_AXES)}", unknown)
  for logical, axes in rules:
    for axis in axes:
      if axis not in names:
        c.problem(f"rules.{logical}", f"a mesh axis of config.mesh {names} or \"\"", axis)
  if sizes is None or num_devices is None:
    return
  try:
    sizes = sharding.mesh_sizes(sizes, num_devices)
  except ValueError as e:
    c.found.append(str(e))
    return
  # Every batch array is split along its leading axis over the first "batch" rule's axes.
  batch_axes = next((axes for logical, axes in rules if logical == "batch"), ())
  split = math.prod(sizes[a] for a in batch_axes if a in sizes)
  where = f"batch axis {' x '.join(batch_axes) or None!r} of mesh {sizes}"
  batch, accum = c.get("batch_size"), c.get("grad_accum", 1)
  if isinstance(batch, int) and isinstance(accum, int) and accum >= 1 and batch % (split * accum):
    c.problem("batch_size", f"a multiple of {split * accum} ({where} x grad_accum {accum})", batch)
  captions, size = c.get("loss.ce_group.captions", 0), c.get("loss.ce_group.size", 0)
  if ((mode is None or mode.has_ce) and c.get("loss.ce", "pairwise") == "listwise"
      and isinstance(captions, int) and isinstance(size, int) and captions * size % split):
    c.problem("loss.ce_group", f"captions x size (a step's CE pairs) a multiple of {split} "
              f"({where})", f"{captions} x {size}")


def _rule_items(rules) -> list[tuple[str, tuple[str, ...]]]:
  """[(logical axis, mesh axes)] in the order `sharding.ordered_rules` gives them.

  A table's value is one mesh axis name, "" (replicated) or several tried in turn ("data,model");
  a list of (logical, axes) pairs keeps its order, a tuple of axes sharding jointly.
  """
  return [(str(logical), sharding.axis_names(axes))
          for logical, axes in sharding.ordered_rules(rules)]
