"""Sharding rules on Flax's machinery: rule order, logged fallbacks, optimizer state, layout bytes.

Shardings are computed on a mesh of placeholder devices (laying out needs no real ones), so
these run in-process; tests/test_sharding.py runs real steps on 8 devices.
"""

import flax.linen as nn
import jax
import ml_collections
import optax
import pytest

from configs import demo
from rerank.data import datasets
from rerank.models import build
from rerank.training import sharding
from rerank.training import steps

FAKE_8 = [object()] * 8


class Known(nn.Module):
  """Three parameters of known sizes: one fsdp splits, one it cannot, one it has no rule for."""

  @nn.compact
  def __call__(self):
    def param(name, axes, shape):
      init = nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)
      return self.param(name, init, shape)
    return (param("kernel", ("embed", "mlp"), (64, 32)),  # embed 64: split 8 ways
            param("odd", ("vocab", "embed"), (47, 12)),  # embed 12: not a multiple of 8
            param("bias", ("mlp",), (32,)))  # no rule for mlp


def _known_params():
  return jax.eval_shape(Known().init, jax.random.PRNGKey(0))["params"]


def _runlocal(mode="joint_alternate", **rules):
  config = demo.get_config(f"runlocal,mode={mode}")
  config.rules.update(rules)
  tok = datasets.get_tokenizer(config)
  model = build.build_model(config, tok.token_to_id("[CLS]"), tok.get_vocab_size())
  return config, model, steps.optimizer(config)


def test_a_table_puts_every_first_choice_before_any_fallback():
  table = {"mlp": "model", "embed": "data,model", "batch": "data", "vocab": ""}
  assert sharding.ordered_rules(table) == (
      ("batch", "data"), ("embed", "data"), ("mlp", "model"), ("embed", "model"))
  assert sharding.ordered_rules({"embed": ("data", "model")}) == (
      ("embed", "data"), ("embed", "model"))
  pairs = [("embed", "model"), ("batch", "data"), ("embed", "data")]  # a t5x list keeps its order
  assert sharding.ordered_rules(pairs) == tuple(pairs)
  for name in ("dp", "fsdp", "tp"):
    assert sharding.rules_label(sharding.RULES[name]) == name
  assert sharding.rules_label(table) == "{batch: data, embed: data,model, mlp: model}"


def test_the_first_mesh_axis_that_applies_wins():
  mesh = sharding.make_mesh({"data": 4, "model": 2}, FAKE_8)
  rules = sharding.ordered_rules({"embed": "data,model", "heads": "model"})
  # 6 is no multiple of data (4): embed falls back to model, when no other dimension has it.
  assert sharding.mesh_axes(("embed", "mlp"), (6, 8), rules, mesh)[0] == sharding.P("model", None)
  assert sharding.mesh_axes(("embed", "mlp"), (8, 8), rules, mesh)[0] == sharding.P("data", None)
  spec, why = sharding.mesh_axes(("embed", "heads"), (6, 4), rules, mesh)
  assert spec == sharding.P(None, "model")
  assert why == ["dim 0 ('embed', size 6) stays replicated: 6 is not a multiple of mesh axis "
                 "'data' (4); mesh axis 'model' already shards dim 1 ('heads')"]


def test_config_rules_take_several_axes_or_ordered_pairs():
  mesh = sharding.make_mesh({"data": 4, "model": 2}, FAKE_8)
  config = demo.get_config("runlocal,sharding=tp")
  config.rules.embed = "data,model"  # as --config.rules.embed=data,model
  assert sharding.rules_from_config(config, mesh) == (
      ("batch", "data"), ("embed", "data"), ("heads", "model"), ("mlp", "model"),
      ("embed", "model"))
  # A config file may give the ordered pairs themselves (not overridable by name).
  pairs = lambda rules: ml_collections.ConfigDict({"rules": rules})  # noqa: E731
  config = pairs([("embed", "model"), ("mlp", "data")])
  assert sharding.rules_from_config(config, mesh) == (("embed", "model"), ("mlp", "data"))
  with pytest.raises(ValueError, match="config.rules .pair 'mlp'.*found 'pipe'"):
    sharding.rules_from_config(pairs([("embed", "model"), ("mlp", "pipe")]), mesh)
  with pytest.raises(ValueError, match=r"unknown logical axes \['hidden'\]"):
    sharding.rules_from_config(pairs([("hidden", "model")]), mesh)


def test_a_rule_that_cannot_apply_logs_the_parameter_and_why_once():
  mesh = sharding.make_mesh({"data": 8}, FAKE_8)
  rules = sharding.ordered_rules(sharding.RULES["fsdp"])
  params = _known_params()
  opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
  state = {"step": jax.ShapeDtypeStruct((), "int32"), "params": params, "opt_state": opt_state}
  lines = []
  shardings = sharding.state_shardings(state, rules, mesh, lines.append)
  # One line for the one parameter, though Adam's mu and nu of it fall back alike.
  assert lines == ["sharding: odd dim 1 ('embed', size 12) stays replicated: 12 is not a "
                   "multiple of mesh axis 'data' (8)"]
  assert shardings["params"]["odd"].spec == sharding.P(None, None)
  assert shardings["params"]["kernel"].spec == sharding.P("data", None)


def test_create_train_state_logs_fallbacks_and_the_layout():
  # embed and mlp both want "data": the MLP kernels' second named dimension cannot have it.
  config, model, tx = _runlocal(mode="ce", embed="data", mlp="data")
  lines = []
  state, layout = sharding.create_train_state(config, model, tx, jax.devices()[:1], lines.append)
  assert ("sharding: encoder/layer_0/intermediate/kernel dim 1 ('mlp', size 128) stays "
          "replicated: mesh axis 'data' already shards dim 0 ('embed')") in lines
  assert ("sharding: encoder/layer_0/mlp_output/kernel dim 0 ('mlp', size 128) stays "
          "replicated: mesh axis 'data' already shards dim 1 ('embed')") in lines
  assert len(lines) == len(set(lines))
  assert lines[-1] == layout.describe()
  assert lines[-1].endswith("mesh {data: 1, model: 1}, rules {batch: data, embed: data, mlp: data}")
  assert state["params"]["encoder"]["layer_0"]["intermediate"]["kernel"].sharding == (
      layout.state["params"]["encoder"]["layer_0"]["intermediate"]["kernel"])


@pytest.mark.parametrize("mode", ["joint_alternate", "separate"])
@pytest.mark.parametrize("preset,mesh", [("fsdp", {"data": 8}), ("tp", {"data": 4, "model": 2})])
def test_optimizer_state_is_laid_out_like_its_parameter(mode, preset, mesh):
  config, model, tx = _runlocal(mode=mode, **sharding.RULES[preset])
  mesh = sharding.make_mesh(mesh, FAKE_8)

  def make_state():
    return steps.init_train_state(model, config, tx, jax.random.PRNGKey(0))

  boxed = sharding.abstract_train_state(model, config, tx, make_state)
  shardings = sharding.state_shardings(boxed, sharding.ordered_rules(config.rules), mesh)
  assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(
      jax.eval_shape(make_state))
  params = shardings["params"]
  split = [s for s in jax.tree_util.tree_leaves(params) if s.spec != sharding.P()]
  assert len(split) > 10  # the preset shards much of this model
  for key, opt in shardings["opt_state"].items():
    adam = opt[1][0]  # clip_by_global_norm, then adamw's ScaleByAdamState
    tree = params[key] if mode == "separate" else params
    assert adam.mu == tree and adam.nu == tree, key
  kernel = ("encoder", "layer_0", "intermediate", "kernel")
  want = {"fsdp": sharding.P("data", None), "tp": sharding.P(None, "model")}[preset]
  got = shardings["opt_state"]["ce"][1][0].mu
  tree = params["ce"] if mode == "separate" else params
  for k in kernel:
    got, tree = got[k], tree[k]
  assert got.spec == tree.spec == want


def test_layout_bytes_of_a_known_model():
  mesh = sharding.make_mesh({"data": 8}, FAKE_8)
  params = _known_params()
  state = {"params": params, "opt_state": jax.eval_shape(optax.adam(1e-3).init, params)}
  shardings = sharding.state_shardings(state, sharding.ordered_rules(sharding.RULES["fsdp"]), mesh)
  size = sharding.layout_size(nn.unbox(state), shardings)
  kernel, odd, bias = 64 * 32 * 4, 47 * 12 * 4, 32 * 4  # float32 bytes
  assert size.params_total == kernel + odd + bias
  assert size.params_per_device == kernel // 8 + odd + bias  # only the kernel divides
  # Adam: mu and nu laid out like the parameters, and an int32 step count.
  assert size.opt_total == 2 * size.params_total + 4
  assert size.opt_per_device == 2 * size.params_per_device + 4
  layout = sharding.TrainLayout(mesh, (), shardings, None, None, size, "fsdp")
  # 3,408 of 10,576 bytes; 2 * 3,408 + 4 of 2 * 10,576 + 4.
  assert layout.describe() == ("layout: params 3.33 KiB/device (of 10.3 KiB), optimizer state "
                               "6.66 KiB/device (of 20.7 KiB), mesh {data: 8}, rules fsdp")


def test_a_pair_with_a_tuple_shards_over_its_axes_jointly():
  # Flax's meaning for a list of pairs: ("batch", ("data", "model")) splits over all 8 devices.
  mesh = sharding.make_mesh({"data": 4, "model": 2}, FAKE_8)
  rules = sharding.ordered_rules([("batch", ("data", "model")), ("embed", ("data", "model")),
                                  ("embed", "model"), ("mlp", None), ("mlp", "data")])
  assert sharding.batch_sharding(mesh, rules).spec == sharding.P(("data", "model"))
  assert sharding.batch_divisor(mesh, rules) == 8
  assert sharding.mesh_axes(("embed",), (16,), rules, mesh) == (sharding.P(("data", "model")), [])
  spec, why = sharding.mesh_axes(("embed", "mlp"), (12, 8), rules, mesh)
  # 12 does not split 8 ways; the fallback takes model. mlp is replicated by rule: no line.
  assert spec == sharding.P("model", None)
  assert why == []
  spec, why = sharding.mesh_axes(("embed",), (5,), rules, mesh)
  assert spec == sharding.P(None) and why == [
      "dim 0 ('embed', size 5) stays replicated: 5 is not a multiple of mesh axes "
      "('data', 'model') (8); 5 is not a multiple of mesh axis 'model' (2)"]
  assert sharding.rules_label(rules) == (
      "{batch: data x model, embed: data x model,model, mlp: none,data}")
