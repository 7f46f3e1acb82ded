"""Device mesh and array layouts from the config: data parallel, FSDP or tensor parallel by rules.

Every model parameter carries logical axis names ("vocab", "embed", "heads", "kv", "mlp"; see
`models/encoder.py`, boxed as `nn.LogicallyPartitioned`) and every batch array has a leading
"batch" axis. Two config fields decide where they live:

- `config.mesh`: mesh axis -> size, e.g. `{"data": -1, "model": 1}`; -1 means "all the devices
  the other axes leave" (at most one axis may say so). Axes are laid out `data` outermost,
  `model` innermost (so a model-parallel group is neighbouring devices, on one host where it
  fits) and any other axis in between by name; a config file cannot order them, since
  ConfigDict sorts its keys.
- `config.rules`: logical axis -> the mesh axes it may be sharded over, first that applies
  wins: "data", "" (replicated), or several as "data,model" or ("data", "model"). The table
  becomes Flax's ordered `(logical, mesh axes)` rules (t5x style): every name's first choice
  (in LOGICAL_AXES order), then every name's second choice, and so on. A config may instead
  give that ordered list of pairs itself, with Flax's meaning: a name repeated in several
  pairs is tried in order, a tuple of mesh axes shards one dimension over all of them
  jointly (`("batch", ("data", "fsdp"))`), None replicates it.

Flax applies the rules (`nn.logical_to_mesh_axes`): a rule applies to a dimension when the
dimension is not placed yet and no other dimension of the array uses its mesh axes. We add
one condition Flax does not know: the dimension's size must be a multiple of the mesh axes'
size. A dimension no rule applies to stays replicated, and the setup logs which parameter,
which dimension and why, so any rules table is valid for any model size (the odd vocabulary
of a tokenizer, say) without hiding the cost. Batch arrays are split along their leading axis
by the first "batch" rule.

The presets in `RULES` are the three classic layouts; they differ in the rules only:
  dp    batch over `data`; every parameter replicated.
  fsdp  as dp, and every parameter's `embed` dimension sharded over `data` too (ZeRO-3 style:
        XLA gathers a layer's weights where it needs them and reduce-scatters its gradients).
  tp    batch over `data`; attention heads and the MLP hidden units split over `model`
        (Megatron style), the rest replicated.
Optimizer state (Adam's mu and nu) is laid out like its parameter: optax keeps the parameters'
boxes on the state `tx.init` builds from them.
"""

import dataclasses
import math
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rerank.models import build
from rerank.models import modes
from rerank.training import steps

LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv", "mlp")
RULES = {
    "dp": dict(batch="data", vocab="", embed="", heads="", kv="", mlp=""),
    "fsdp": dict(batch="data", vocab="", embed="data", heads="", kv="", mlp=""),
    "tp": dict(batch="data", vocab="", embed="", heads="model", kv="", mlp="model"),
}

MeshAxes = str | tuple[str, ...] | None  # one mesh axis, several jointly, or replicated
Rules = tuple[tuple[str, MeshAxes], ...]  # ordered (logical axis, mesh axes) pairs, Flax's form


def mesh_sizes(mesh_cfg, num_devices: int | None = None) -> dict[str, int]:
  """Axis name -> size in mesh order (`data` outermost, `model` innermost), -1 resolved.

  Without `num_devices` only the sizes themselves are checked (-1 stays). Raises ValueError,
  one `config.mesh: expected ...; found ...` line (`rerank.training.validate` reports it).
  """
  rank = lambda name: (name != "data", name == "model", name)  # noqa: E731
  sizes = {str(n): mesh_cfg[n] for n in sorted(mesh_cfg.keys(), key=rank)}
  values = list(sizes.values())
  if (any(isinstance(v, bool) or not isinstance(v, int) or v == 0 or v < -1 for v in values)
      or values.count(-1) > 1):
    raise ValueError("config.mesh: expected positive sizes and at most one -1 (all the devices "
                     f"the other axes leave); found {sizes}")
  if num_devices is None:
    return sizes
  fixed = math.prod(v for v in values if v != -1)
  if -1 in values:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: expected fixed axes whose product ({fixed}) divides the "
                       f"{num_devices} devices; found {sizes}")
    return {k: num_devices // fixed if v == -1 else v for k, v in sizes.items()}
  if fixed != num_devices:
    raise ValueError(f"config.mesh: expected axes whose sizes multiply to the {num_devices} "
                     f"devices; found {sizes}")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A Mesh with the config's axes in order; one size may be -1 (the remaining devices).

  Args:
    mesh_cfg: mapping of axis name -> size (a ConfigDict or dict).
    devices: the devices to lay out (default: all devices of all processes).
  Raises:
    ValueError: sizes that do not fit the devices (`mesh_sizes`).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_sizes(mesh_cfg, len(devices))
  names, sizes = tuple(shape), list(shape.values())
  if getattr(devices[0], "platform", "") == "tpu":
    # The physical torus decides which chips are neighbours; let jax map the axes onto it.
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  else:
    # jax.devices() is process-major, so `model` (innermost) stays within a host (NVLink).
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  # Auto axes: XLA propagates shardings inside jit; we only pin inputs and outputs.
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def _is_table(rules) -> bool:
  """A logical -> mesh axes table (dict or ConfigDict), as opposed to a list of pairs."""
  return hasattr(rules, "keys")


def _choices(axes) -> list[str]:
  """A table's value -> its mesh axes, in order: "data" | "data,model" | ("data", "model") | ""."""
  if axes is None:
    return []
  if isinstance(axes, str):
    axes = axes.split(",")
  return [a.strip() for a in axes if a and a.strip()]


def _pair_axes(axes) -> MeshAxes:
  """A pair's mesh axes as Flax takes them: a name, a tuple (joint) of two or more, or None."""
  if axes is None or isinstance(axes, str):
    return axes or None
  axes = tuple(a for a in axes if a)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def axis_names(axes: MeshAxes) -> tuple[str, ...]:
  """The mesh axis names of one rule's mesh axes (() for None)."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _ways(axes: MeshAxes, mesh: Mesh) -> int:
  """How many shards `axes` cut a dimension into."""
  return int(np.prod([mesh.shape[a] for a in axis_names(axes)], dtype=np.int64))


def ordered_rules(rules) -> Rules:
  """Flax's ordered (logical, mesh axes) pairs from a rules table or a list of pairs.

  A table (logical -> mesh axes) is ordered by choice, then by LOGICAL_AXES: every name's
  first mesh axis comes before any name's fallback, so a fallback never takes a mesh axis
  from another name's first choice; "" gives no rule. A list of pairs keeps its order.
  """
  if not _is_table(rules):
    return tuple((name, _pair_axes(axes)) for name, axes in rules)
  rank = {name: i for i, name in enumerate(LOGICAL_AXES)}
  names = sorted(rules, key=lambda n: (rank.get(n, len(rank)), n))
  table = {name: _choices(rules[name]) for name in names}
  depth = max((len(c) for c in table.values()), default=0)
  return tuple((name, table[name][i]) for i in range(depth) for name in names
               if i < len(table[name]))


def rules_from_config(config, mesh: Mesh) -> Rules:
  """The ordered rules of `config.rules`, checked against LOGICAL_AXES and the mesh."""
  rules = config.rules
  if _is_table(rules):
    where = {name: f"config.rules.{name}" for name in rules}
  else:
    rules = [tuple(pair) for pair in rules]
    where = {name: f"config.rules (pair {name!r})" for name, _ in rules}
  pairs = ordered_rules(rules)
  unknown = sorted({name for name, _ in pairs} - set(LOGICAL_AXES))
  if unknown:
    raise ValueError(f"config.rules: unknown logical axes {unknown}; "
                     f"expected some of {list(LOGICAL_AXES)}")
  for name, axes in pairs:
    for axis in axis_names(axes):
      if axis not in mesh.axis_names:
        raise ValueError(f"{where[name]}: expected mesh axes of config.mesh "
                         f"{list(mesh.axis_names)} or \"\"; found {axis!r}")
  return pairs


def rules_label(rules) -> str:
  """The preset's name when `rules` is one ("fsdp"), else its rules ("{embed: data,model}")."""
  pairs = ordered_rules(rules)
  for name, preset in RULES.items():
    if pairs == ordered_rules(preset):
      return name
  table = {}
  for name, axes in pairs:
    table.setdefault(name, []).append(" x ".join(axis_names(axes)) or "none")
  return "{" + ", ".join(f"{n}: {','.join(a)}" for n, a in table.items()) + "}"


def mesh_axes(names, shape, rules: Rules, mesh: Mesh) -> tuple[P, list[str]]:
  """PartitionSpec of one array from its logical axis names, and why dimensions stay whole.

  Flax's `logical_to_mesh_axes` places the dimensions; the rules it sees are those whose mesh
  axes divide their dimension. Returns (spec, reasons): one line per named dimension that
  stays replicated because its rules could not apply (not for a rule that replicates it).
  """
  names = tuple(names)
  dims = {name: i for i, name in enumerate(names) if name is not None}
  fits = lambda name, axes: shape[dims[name]] % _ways(axes, mesh) == 0  # noqa: E731
  usable = tuple((n, a) for n, a in rules if n in dims and fits(n, a))
  spec = nn.logical_to_mesh_axes(names, usable)
  reasons = []
  for i, name in enumerate(names):
    if spec[i] is not None:
      continue
    why = []
    for axes in [a for n, a in rules if n == name]:
      if axes is None:  # the rules replicate it from here on
        break
      label = f"mesh axis {axes!r}" if isinstance(axes, str) else f"mesh axes {axes!r}"
      if not fits(name, axes):
        why.append(f"{shape[i]} is not a multiple of {label} ({_ways(axes, mesh)})")
      else:
        j = next(j for j, got in enumerate(spec) if set(axis_names(got)) & set(axis_names(axes)))
        why.append(f"{label} already shards dim {j} ({names[j]!r})")
    if why:
      reasons.append(f"dim {i} ({name!r}, size {shape[i]}) stays replicated: {'; '.join(why)}")
  return spec, reasons


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def tree_shardings(boxed, rules: Rules, mesh: Mesh, log: Callable[[str], None] | None = None):
  """NamedShardings of an abstract tree whose leaves may be boxed with logical names.

  The result has the unboxed tree's structure: a box becomes its array's sharding, an array
  without a box is replicated. `log` gets one line per (leaf path, reason) a rule could not
  apply for.
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731

  def one(path, leaf):
    if not is_box(leaf):
      return NamedSharding(mesh, P())
    spec, reasons = mesh_axes(leaf.names, leaf.value.shape, rules, mesh)
    for reason in reasons if log is not None else ():
      log(f"sharding: {_path(path)} {reason}")  # reasons name their dimension: no repeats
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, boxed, is_leaf=is_box)


def abstract_train_state(model, config, tx, make_state: Callable[[], dict]) -> dict:
  """The shapes of `make_state()`, with parameters and optimizer state still boxed.

  The parameters come from `model.init` under `jax.eval_shape` (boxes kept, one tree per
  `mode.param_trees` as `build.init_params` lays them out); the optimizer state from
  `steps.init_opt_state` (so `tx.init`) on those boxed parameters, which keeps the boxes on
  Adam's mu and nu.
  """
  state = jax.eval_shape(make_state)
  one = lambda r: model.init(r, *build.dummy_inputs(config, model=model))["params"]  # noqa: E731
  params = jax.eval_shape(one, jax.random.PRNGKey(0))
  trees = modes.get(config.mode).param_trees
  if trees:
    params = {name: params for name in trees}
  opt_state = jax.eval_shape(lambda p: steps.init_opt_state(tx, p, config.mode), params)
  boxed = {**state, "params": params, "opt_state": opt_state}
  if jax.tree_util.tree_structure(nn.unbox(boxed)) != jax.tree_util.tree_structure(state):
    raise ValueError(f"mode {config.mode!r}: the boxed parameters and optimizer state differ in "
                     "structure from steps.init_train_state's; keep build.init_params and "
                     "abstract_train_state alike")
  return boxed


def state_shardings(boxed_state: dict, rules: Rules, mesh: Mesh,
                    log: Callable[[str], None] | None = None) -> dict:
  """NamedShardings of a train state: parameters and optimizer state by their boxes.

  Only the parameters log why a rule did not apply: their optimizer moments carry the same
  boxes, so the same decisions, and one line per parameter is enough.
  """
  out = tree_shardings({k: v for k, v in boxed_state.items() if k != "params"}, rules, mesh)
  out["params"] = tree_shardings(boxed_state["params"], rules, mesh, log)
  return {k: out[k] for k in boxed_state}  # the state's key order


@dataclasses.dataclass(frozen=True)
class LayoutSize:
  """Bytes of parameters and optimizer state: on each device, and in all (unsharded)."""

  params_per_device: int
  params_total: int
  opt_per_device: int
  opt_total: int


def _bytes(shapes, shardings) -> tuple[int, int]:
  """(bytes on one device, bytes in all) of a tree of ShapeDtypeStructs laid out by `shardings`."""
  per_device = total = 0
  for x, sh in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
    item = np.dtype(x.dtype).itemsize
    per_device += int(np.prod(sh.shard_shape(x.shape), dtype=np.int64)) * item
    total += int(np.prod(x.shape, dtype=np.int64)) * item
  return per_device, total


def layout_size(abstract_state: dict, shardings: dict) -> LayoutSize:
  """Bytes per device and in all of `abstract_state`'s params and opt_state (unboxed shapes)."""
  p = _bytes(abstract_state["params"], shardings["params"])
  o = _bytes(abstract_state["opt_state"], shardings["opt_state"])
  return LayoutSize(p[0], p[1], o[0], o[1])


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class TrainLayout:
  """Where a training run's arrays live: the mesh, the rules and the resulting shardings."""

  mesh: Mesh
  rules: Rules  # ordered (logical, mesh axis) pairs
  state: Any  # pytree of NamedSharding, like the train state
  batch: NamedSharding  # every batch array, split along its leading axis
  replicated: NamedSharding
  size: LayoutSize
  rules_name: str  # the preset ("fsdp") or the rules table

  def describe(self) -> str:
    """One log line: "layout: params 1.2 MiB/device (of 9.6 MiB), optimizer state ..."."""
    s = self.size
    mesh = ", ".join(f"{k}: {v}" for k, v in self.mesh.shape.items())
    return (f"layout: params {_human(s.params_per_device)}/device (of {_human(s.params_total)}), "
            f"optimizer state {_human(s.opt_per_device)}/device (of {_human(s.opt_total)}), "
            f"mesh {{{mesh}}}, rules {self.rules_name}")


def batch_axis(rules) -> MeshAxes:
  """The mesh axes batch arrays are split over: the first "batch" rule's (None = not split)."""
  return next((axes for name, axes in ordered_rules(rules) if name == "batch"), None)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Every batch array is split along its leading (example) dimension by the "batch" rule."""
  return NamedSharding(mesh, P(batch_axis(rules)))


def batch_divisor(mesh: Mesh, rules) -> int:
  """How many ways the batch is split: batch sizes must be a multiple of this."""
  return _ways(batch_axis(rules), mesh)


def shard_batch(batch, sharding: NamedSharding):
  """Host numpy batch (the same global batch on every process) -> global jax Arrays.

  Each process copies only the rows its own devices hold onto them, so a multi-host job moves
  1/num_processes of the batch per host (and a `batches.LazyRows` leaf reads only those rows).
  """
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), batch)


def local_replica(tree, mesh: Mesh):
  """A copy of a (possibly sharded, multi-host) tree whole on this process's first device.

  For host-side work that every process does alike (dev evaluation, hard-negative mining):
  gathered with one collective, then used by ordinary single-device jit calls.
  """
  replicated = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
  return jax.tree_util.tree_map(lambda x: x.addressable_data(0), replicated)


def create_train_state(config, model, tx, devices=None,
                       log: Callable[[str], None] | None = None) -> tuple[dict, TrainLayout]:
  """Mesh + rules + a jitted init that creates the train state already sharded.

  The one setup path of the trainer, `rerank.bench_train` and the multi-device tests.

  Args:
    config: the run's config (`mesh`, `rules`, `mode`, `seed`, model and input sizes).
    model: the RetrievalModel.
    tx: the optimizer.
    devices: the devices to lay out (default: every device of every process).
    log: gets the layout line and one line per parameter dimension a rule could not apply to
      (default: Python logging, at INFO and WARNING).
  Returns:
    (state, layout): {step, params, opt_state, rng} placed by `layout.state`.
  Raises:
    ValueError: a mesh or rules table that does not fit the devices or the model.
  """
  logger = logging.getLogger(__name__)
  mesh = make_mesh(config.mesh, devices)
  rules = rules_from_config(config, mesh)

  def make_state():
    return steps.init_train_state(model, config, tx, jax.random.PRNGKey(config.seed))

  boxed = abstract_train_state(model, config, tx, make_state)
  state_sh = state_shardings(boxed, rules, mesh, log or logger.warning)
  layout = TrainLayout(mesh, rules, state_sh, batch_sharding(mesh, rules), NamedSharding(mesh, P()),
                       layout_size(nn.unbox(boxed), state_sh), rules_label(config.rules))
  (log or logger.info)(layout.describe())
  return jax.jit(make_state, out_shardings=state_sh)(), layout
