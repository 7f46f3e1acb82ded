"""Pure, jittable pieces of training: model construction, optimizer, losses, the update step.

Everything here is a function of its arguments (params, batch, rng); the trainer loop in
`rerank/train.py` owns side effects, and calls `check_finite` on the metrics it fetches.
What a step updates comes from the mode (`rerank.models.modes.Mode.updates`):
- `be`, `ce`: one objective, one optimizer.
- `joint_alternate`: ONE parameter tree, two optimizers (as the authors' multi-objective fit):
  each step does a BE update and then a CE update, each with its own forward/backward/clip.
- `joint_sum`: one update on `be_loss + ce_weight * ce_loss`.
- `separate`: two parameter trees `{"be", "ce"}` trained side by side, one optimizer each.
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax

from rerank.models import build
from rerank.models import modes
from rerank.training import losses


def schedule(config) -> optax.Schedule:
  """Linear warmup (optional) then linear decay to 0 at `total_steps`."""
  decay = optax.linear_schedule(config.lr, 0.0, max(config.total_steps - config.warmup_steps, 1))
  if config.warmup_steps <= 0:
    return decay
  warm = optax.linear_schedule(0.0, config.lr, config.warmup_steps)
  return optax.join_schedules([warm, decay], [config.warmup_steps])


def _decay_mask(params):
  # No weight decay on biases and LayerNorm (Flax calls the LN weight "scale").
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def optimizer(config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule(config), b1=0.9, b2=0.999, eps=config.adam_eps,
                  weight_decay=config.weight_decay, mask=_decay_mask))


def init_opt_state(tx, params, mode) -> dict:
  """{opt_key: optimizer state} for each update of `mode` (a Mode or its name)."""
  return {u.opt_key: tx.init(_tree(params, u)) for u in modes.get(mode).updates}


def _tree(params, update: modes.Update):
  """The parameters `update` trains: one tree of a two-tree model, else all of them."""
  return params[update.tree] if update.tree else params


def init_train_state(model, config, tx, rng) -> dict:
  """{step, params, opt_state, rng}: everything a checkpoint holds and resume restores."""
  r_init, r_train = jax.random.split(rng)
  params = build.init_params(model, config, r_init)
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": init_opt_state(tx, params, config.mode), "rng": r_train}


def be_loss(model, config, params, batch, rng):
  """Bi-encoder loss on a caption batch; returns (loss, metrics)."""
  rngs = {"dropout": rng}
  txt = model.apply({"params": params}, batch["token_ids"], batch["text_mask"], False,
                    method=model.embed_text, rngs=rngs)  # [B, H]
  img = model.apply({"params": params}, batch["regions"], batch["region_mask"], False,
                    method=model.embed_image, rngs=rngs)  # [B, H]
  ids = batch["image_ids"]
  name = config.loss.be
  if name == "vsepp":
    loss = losses.vsepp_triplet_loss(txt, img, ids, ids, margin=config.loss.margin)
  elif name == "infonce":
    loss = losses.infonce_loss(txt, img, ids, ids, temperature=config.loss.temperature)
  else:
    raise ValueError(f"config.loss.be: expected one of {sorted(losses.BE_LOSSES)}; found {name!r}")
  metrics = {"be_loss": loss}
  if "neg_regions" in batch:  # ANCE: + a sampled-triplet loss on mined negatives
    neg = model.apply({"params": params}, batch["neg_regions"], batch["neg_region_mask"], False,
                      method=model.embed_image, rngs=rngs)  # [B * n, H]
    neg = neg.reshape(txt.shape[0], -1, neg.shape[-1])  # [B, n, H]
    metrics["be_mined_loss"] = losses.sampled_triplet_loss(txt, img, neg, config.loss.margin)
    loss = loss + metrics["be_mined_loss"]
  return loss, metrics


def ce_loss(model, params, batch, rng, group: int = 0):
  """Cross-encoder loss; returns (loss, metrics).

  group=0: the authors' 2-class loss on labelled pairs. group=G: pairs come in groups of G with
  the positive first (`batches.ce_group_batch`); softmax over each group's match logits.
  """
  logits = model.apply({"params": params}, batch["token_ids"], batch["text_mask"], batch["regions"],
                       batch["region_mask"], False, method=model.score_pairs,
                       rngs={"dropout": rng})  # [P, 2]
  if group:
    match = logits[:, 1].reshape(-1, group)  # [B, G]
    loss = losses.listwise_loss(match)
    return loss, {"ce_loss": loss, "ce_acc": jnp.mean(jnp.argmax(match, -1) == 0)}
  loss = losses.cross_entropy_loss(logits, batch["labels"])
  return loss, {"ce_loss": loss, "ce_acc": losses.pair_accuracy(logits, batch["labels"])}


def _microbatches(batch, k: int):
  """Splits a step's batch into k equal micro-batches, stacked on a new leading axis.

  BE arrays are [B, ...] -> [k, B/k, ...]. CE arrays are laid out [positives; negatives] (2B
  rows), so each micro-batch takes B/k positives and the matching B/k negatives.
  """
  def split(x, paired):
    if x.shape[0] % (2 * k if paired else k):
      raise ValueError(f"config.grad_accum={k} must divide the batch; found {x.shape[0]} rows")
    if paired:  # [2B, ...] -> [2, k, B/k, ...] -> [k, 2, B/k, ...] -> [k, 2B/k, ...]
      x = x.reshape(2, k, -1, *x.shape[1:]).swapaxes(0, 1)
      return x.reshape(k, -1, *x.shape[3:])
    return x.reshape(k, -1, *x.shape[1:])
  return {name: jax.tree_util.tree_map(lambda x: split(x, name == "ce"), part)
          for name, part in batch.items()}


def _value_and_grad(loss_fn, params, batch, rng, accum: int):
  """((loss, metrics), grads) of loss_fn(params, batch, rng), averaged over `accum` micro-batches.

  `rng` may be a tuple of keys; micro-batch i folds i into each.

  With accum > 1 the micro-batches run one after another (lax.scan), so activation memory is
  that of B/accum examples. In-batch-negative losses (VSE++, InfoNCE) then see B/accum
  candidates per query: accumulation changes those objectives, it does not only save memory.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    return grad_fn(params, batch, rng)

  def body(carry, xs):
    i, micro = xs
    out = grad_fn(params, micro, jax.tree_util.tree_map(lambda r: jax.random.fold_in(r, i), rng))
    return jax.tree_util.tree_map(jnp.add, carry, out), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, rng))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), _microbatches(batch, accum)))
  return jax.tree_util.tree_map(lambda x: x / accum, total)


def _update(tx, loss_fn, params, opt_state, batch, rng, prefix: str, accum: int = 1):
  (loss, metrics), grads = _value_and_grad(loss_fn, params, batch, rng, accum)
  updates, opt_state = tx.update(grads, opt_state, params)
  metrics[f"{prefix}grad_norm"] = optax.tree.norm(grads)
  return optax.apply_updates(params, updates), opt_state, loss, metrics


def train_step(model, config, tx, state, batch):
  """One step of `config.mode`. state = {step, params, opt_state, rng}; returns (state, metrics).

  Runs the mode's updates in order (`modes.Mode.updates`); a later update sees the parameters
  an earlier one produced. Metrics of a mode with two updates carry the update's prefix
  (`be_grad_norm`, `ce_grad_norm`); `loss` is the sum of the updates' losses.
  `config.grad_accum` (default 1) splits the batch into that many micro-batches per update.
  """
  mode = modes.get(config.mode)
  accum = int(getattr(config, "grad_accum", 1) or 1)
  rng, r_be, r_ce = jax.random.split(state["rng"], 3)
  params, opt = state["params"], dict(state["opt_state"])
  group = config.loss.ce_group.size if config.loss.get("ce", "pairwise") == "listwise" else 0
  be_fn = lambda p, b, r: be_loss(model, config, p, b["be"], r)  # noqa: E731
  ce_fn = lambda p, b, r: ce_loss(model, p, b["ce"], r, group)  # noqa: E731

  def objective(names):
    """(loss_fn(params, batch, rng), rng) of an update on `names`: ("be",), ("ce",) or both."""
    if names == ("be",):
      return be_fn, r_be
    if names == ("ce",):
      return ce_fn, r_ce

    def sum_fn(p, b, r):  # r = (r_be, r_ce)
      l_be, m_be = be_fn(p, b, r[0])
      l_ce, m_ce = ce_fn(p, b, r[1])
      return l_be + config.loss.ce_weight * l_ce, {**m_be, **m_ce}
    return sum_fn, (r_be, r_ce)

  loss, metrics = None, {}
  for u in mode.updates:
    fn, r = objective(u.objectives)
    prefix = f"{u.opt_key}_" if len(mode.updates) > 1 else ""
    new, opt[u.opt_key], u_loss, u_metrics = _update(tx, fn, _tree(params, u), opt[u.opt_key],
                                                     batch, r, prefix, accum)
    params = {**params, u.tree: new} if u.tree else new
    loss = u_loss if loss is None else loss + u_loss
    metrics.update(u_metrics)
  metrics["loss"] = loss
  metrics["lr"] = schedule(config)(state["step"])
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt, "rng": rng}
  return new_state, metrics


def make_train_step(model, config, tx):
  return functools.partial(train_step, model, config, tx)


class NonFiniteLossError(FloatingPointError):
  """A loss or gradient norm became NaN or inf; the message names the step and every loss."""


def check_finite(step: int, metrics: dict, last_checked: int = 0) -> None:
  """Raises NonFiniteLossError if a loss or gradient norm in (host) `metrics` is not finite.

  Args:
    step: the step these metrics come from.
    metrics: {name: scalar} of `train_step`, fetched to the host.
    last_checked: the previous step that was checked: the values went bad in (last_checked, step].
  """
  watched = {k: float(v) for k, v in metrics.items()
             if k.endswith("loss") or k.endswith("grad_norm")}
  if all(math.isfinite(v) for v in watched.values()):
    return
  values = " ".join(f"{k}={v:.6g}" for k, v in sorted(watched.items()))
  since = f" (finite at step {last_checked}, the previous check)" if last_checked else ""
  raise NonFiniteLossError(f"loss is not finite at step {step}{since}: {values}; try a lower "
                           "config.lr or a longer config.warmup_steps")
