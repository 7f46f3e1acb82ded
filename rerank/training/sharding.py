"""Device mesh and array layouts from the config: data parallel, FSDP or tensor parallel by rules.

Every model parameter carries logical axis names ("vocab", "embed", "heads", "kv", "mlp"; see
`models/encoder.py`) and every batch array has a leading "batch" axis. Two config fields decide
where they live:

- `config.mesh`: mesh axis -> size, e.g. `{"data": -1, "model": 1}`; -1 means "all the devices
  the other axes leave" (at most one axis may say so). Axes are laid out `data` outermost,
  `model` innermost (so a model-parallel group is neighbouring devices, on one host where it
  fits) and any other axis in between by name; a config file cannot order them, since
  ConfigDict sorts its keys.
- `config.rules`: logical axis -> mesh axis name ("" = replicated along that dimension).

The presets in `RULES` are the three classic layouts; they differ in the rules only:
  dp    batch over `data`; every parameter replicated.
  fsdp  as dp, and every parameter's `embed` dimension sharded over `data` too (ZeRO-3 style:
        XLA gathers a layer's weights where it needs them and reduce-scatters its gradients).
  tp    batch over `data`; attention heads and the MLP hidden units split over `model`
        (Megatron style), the rest replicated.
A dimension whose size is not a multiple of its mesh axis, or whose mesh axis an earlier
dimension of the same array already uses, stays replicated, so any rules table is valid for
any model size (the odd vocabulary of a tokenizer, say).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rerank.models import build

from rerank.training import steps

LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv", "mlp")
RULES = {
    "dp": dict(batch="data", vocab="", embed="", heads="", kv="", mlp=""),
    "fsdp": dict(batch="data", vocab="", embed="data", heads="", kv="", mlp=""),
    "tp": dict(batch="data", vocab="", embed="", heads="model", kv="", mlp="model"),
}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A Mesh with the config's axes in order; one size may be -1 (the remaining devices).

  Args:
    mesh_cfg: mapping of axis name -> size (a ConfigDict or dict).
    devices: the devices to lay out (default: all devices of all processes).
  """
  devices = list(jax.devices() if devices is None else devices)
  rank = lambda name: (name != "data", name == "model", name)  # noqa: E731
  names = sorted(mesh_cfg.keys(), key=rank)
  sizes = [int(mesh_cfg[n]) for n in names]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: expected positive sizes and at most one -1; "
                     f"found {dict(zip(names, sizes))}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh: the fixed axes ({fixed} devices) must divide the "
                       f"{len(devices)} devices; found {dict(zip(names, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh: axes {dict(zip(names, sizes))} need {int(np.prod(sizes))} "
                     f"devices; found {len(devices)}")
  if getattr(devices[0], "platform", "") == "tpu":
    # The physical torus decides which chips are neighbours; let jax map the axes onto it.
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  else:
    # jax.devices() is process-major, so `model` (innermost) stays within a host (NVLink).
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  # Auto axes: XLA propagates shardings inside jit; we only pin inputs and outputs.
  return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def rules_from_config(config, mesh: Mesh) -> dict[str, str]:
  """The logical -> mesh axis table of `config.rules`, checked against LOGICAL_AXES and the mesh."""
  rules = dict(config.rules)
  unknown = sorted(set(rules) - set(LOGICAL_AXES))
  if unknown:
    raise ValueError(f"config.rules: unknown logical axes {unknown}; "
                     f"expected some of {list(LOGICAL_AXES)}")
  for logical, axis in rules.items():
    if axis and axis not in mesh.axis_names:
      raise ValueError(f"config.rules.{logical}: expected a mesh axis of config.mesh "
                       f"{list(mesh.axis_names)} or \"\"; found {axis!r}")
  return rules


def mesh_spec(logical: tuple, shape: tuple[int, ...], rules: dict, mesh: Mesh) -> P:
  """PartitionSpec of one array from its logical axis names (None = never sharded)."""
  out, used = [], set()
  for name, size in zip(logical, shape):
    axis = rules.get(name, "") if name else ""
    if axis and axis not in used and size % mesh.shape[axis] == 0:
      out.append(axis)
      used.add(axis)
    else:
      out.append(None)
  return P(*out)


def logical_param_axes(model, config) -> dict:
  """{param key path (tuple of names): logical axis names} for the layout of `config.mode`."""
  boxed = jax.eval_shape(
      lambda r: model.init(r, *build.dummy_inputs(config))["params"], jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  axes = {tuple(k.key for k in path): tuple(spec) for path, spec in flat}
  if config.mode == "separate":  # two copies of the same model, under "be" and "ce"
    axes = {(side, *k): v for side in ("be", "ce") for k, v in axes.items()}
  return axes


def state_shardings(abstract_state, param_axes: dict, rules: dict, mesh: Mesh):
  """NamedShardings for a train state: params by rules, optimizer moments like their params.

  An optimizer-state leaf (Adam's mu, nu) is matched to a parameter by the longest suffix of
  its dict-key path that names a parameter of the same rank; other leaves (step, counts, rng)
  are replicated.
  """
  def one(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for i in range(len(keys)):
      logical = param_axes.get(keys[i:])
      if logical is not None and len(logical) == len(leaf.shape):
        return NamedSharding(mesh, mesh_spec(logical, leaf.shape, rules, mesh))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
  """Every batch array is split along its leading (example) dimension by the "batch" rule."""
  axis = rules.get("batch", "")
  return NamedSharding(mesh, P(axis or None))


def batch_divisor(mesh: Mesh, rules: dict) -> int:
  """How many ways the batch is split: batch sizes must be a multiple of this."""
  axis = rules.get("batch", "")
  return mesh.shape[axis] if axis else 1


def shard_batch(batch, sharding: NamedSharding):
  """Host numpy batch (the same global batch on every process) -> global jax Arrays.

  Each process copies only the rows its own devices hold onto them, so a multi-host job moves
  1/num_processes of the batch per host.
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


@dataclasses.dataclass(frozen=True)
class TrainLayout:
  """Where a training run's arrays live: the mesh, the rules and the resulting shardings."""

  mesh: Mesh
  rules: dict
  state: Any  # pytree of NamedSharding, like the train state
  batch: NamedSharding  # every batch array, split along its leading axis
  replicated: NamedSharding


def create_train_state(config, model, tx, devices=None) -> tuple[dict, TrainLayout]:
  """Mesh + rules + a jitted init that creates the train state already sharded.

  The one setup path of the trainer, `rerank.bench_train` and the multi-device tests.

  Args:
    config: the run's config (`mesh`, `rules`, `mode`, `seed`, model and input sizes).
    model: the RetrievalModel.
    tx: the optimizer.
    devices: the devices to lay out (default: every device of every process).
  Returns:
    (state, layout): {step, params, opt_state, rng} placed by `layout.state`.
  Raises:
    ValueError: a mesh or rules table that does not fit the devices or the model.
  """
  mesh = make_mesh(config.mesh, devices)
  rules = rules_from_config(config, mesh)
  make_state = lambda: steps.init_train_state(model, config, tx, jax.random.PRNGKey(config.seed))  # noqa: E731
  state_sh = state_shardings(jax.eval_shape(make_state), logical_param_axes(model, config), rules,
                             mesh)
  layout = TrainLayout(mesh, rules, state_sh, batch_sharding(mesh, rules), NamedSharding(mesh, P()))
  return jax.jit(make_state, out_shardings=state_sh)(), layout
