"""Pure, jittable pieces of training: model construction, optimizer, losses, the update step.

Everything here is a function of its arguments (params, batch, rng); the trainer loop in
`rerank/train.py` owns side effects. Modes (see `retrieval.MODES`):
- `be`, `ce`: one objective, one optimizer.
- `joint_alternate`: ONE parameter tree, two optimizers (as the authors' multi-objective fit):
  each step does a BE update and then a CE update, each with its own forward/backward/clip.
- `joint_sum`: one update on `be_loss + ce_weight * ce_loss`.
- `separate`: two parameter trees `{"be", "ce"}` trained side by side, one optimizer each.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rerank import losses
from rerank.models import encoder as encoder_lib
from rerank.models import retrieval


# With `config.init_from`, these config.model fields still apply; the architecture (sizes, eps,
# activation, input layout) comes from the converted checkpoint.
_RUNTIME_FIELDS = ("dtype", "remat", "dropout_rate", "attention_dropout_rate")


def build_model(config, cls_token_id: int, vocab_size: int) -> retrieval.RetrievalModel:
  fields = {k: v for k, v in config.model.to_dict().items() if k != "head_dropout"}
  if config.get("init_from"):
    from rerank.models import load  # pylint: disable=import-outside-toplevel
    meta = load.read_meta(config.init_from)
    runtime = {k: fields[k] for k in _RUNTIME_FIELDS if k in fields}
    cfg = load.encoder_config(meta, **runtime)
    width = config.model.feature_dim + config.model.box_dim
    if cfg.feature_dim + cfg.box_dim != width:
      raise ValueError(f"config.init_from {config.init_from!r}: the checkpoint embeds regions of "
                       f"{cfg.feature_dim}+{cfg.box_dim} values; config.model has {width}")
    longest = config.max_text_len + (config.max_regions if cfg.positions == "sequence" else 0)
    if longest + cfg.position_offset > cfg.max_position_embeddings:
      raise ValueError(f"config.max_text_len {config.max_text_len}: the checkpoint {config.init_from!r} has "
                       f"{cfg.max_position_embeddings} positions (offset {cfg.position_offset}); at most "
                       f"{cfg.max_position_embeddings - cfg.position_offset} tokens per sequence fit")
    cls_token_id = meta["cls_token_id"]
  else:
    cfg = encoder_lib.EncoderConfig(vocab_size=vocab_size, **fields)
  return retrieval.RetrievalModel(cfg, cls_token_id=cls_token_id,
                                  head_dropout=config.model.get("head_dropout", 0.1))


def with_pretrained_encoder(params, encoder_params, mode: str):
  """`params` with every encoder tree replaced by `encoder_params` (heads keep their init).

  Raises ValueError naming the first parameter whose path or shape differs.
  """
  def replace(tree):
    want = jax.tree_util.tree_flatten_with_path(tree["encoder"])[0]
    have = dict(jax.tree_util.tree_flatten_with_path(encoder_params)[0])
    if len(have) != len(want):
      raise ValueError(f"init_from: checkpoint has {len(have)} encoder tensors, the model {len(want)}")
    for path, leaf in want:
      if path not in have or tuple(have[path].shape) != tuple(leaf.shape):
        found = tuple(have[path].shape) if path in have else "nothing"
        raise ValueError(f"init_from: encoder{jax.tree_util.keystr(path)}: model expects "
                         f"{tuple(leaf.shape)}, checkpoint has {found}")
    new = jax.tree_util.tree_map(lambda x, y: jnp.asarray(y, x.dtype), tree["encoder"], encoder_params)
    return {**tree, "encoder": new}
  if mode == "separate":
    return {k: replace(v) for k, v in params.items()}
  return replace(params)


def dummy_inputs(config, batch: int = 1):
  regions_width = config.model.feature_dim + config.model.box_dim
  return (jnp.zeros((batch, config.max_text_len), jnp.int32),
          jnp.ones((batch, config.max_text_len), bool),
          jnp.zeros((batch, config.max_regions, regions_width), jnp.float32),
          jnp.ones((batch, config.max_regions), bool))


def init_params(model, config, rng):
  """Fresh float32 parameters in the layout of `config.mode` (unboxed from logical metadata)."""
  init = lambda r: nn.unbox(model.init(r, *dummy_inputs(config))["params"])  # noqa: E731
  if config.mode == "separate":
    r_be, r_ce = jax.random.split(rng)
    return {"be": init(r_be), "ce": init(r_ce)}
  return init(rng)


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


def init_opt_state(tx, params, mode: str):
  if mode == "separate":
    return {"be": tx.init(params["be"]), "ce": tx.init(params["ce"])}
  if mode == "joint_alternate":
    return {"be": tx.init(params), "ce": tx.init(params)}
  return {"main": tx.init(params)}


def init_train_state(model, config, tx, rng) -> dict:
  """{step, params, opt_state, rng}: everything a checkpoint holds and resume restores."""
  r_init, r_train = jax.random.split(rng)
  params = init_params(model, config, r_init)
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
  return loss, {"be_loss": loss}


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


def _update(tx, loss_fn, params, opt_state, prefix: str):
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  metrics[f"{prefix}grad_norm"] = optax.tree.norm(grads)
  return optax.apply_updates(params, updates), opt_state, loss, metrics


def train_step(model, config, tx, state, batch):
  """One step of `config.mode`. state = {step, params, opt_state, rng}; returns (state, metrics)."""
  mode = config.mode
  rng, r_be, r_ce = jax.random.split(state["rng"], 3)
  params, opt = state["params"], dict(state["opt_state"])
  be_fn = lambda p: be_loss(model, config, p, batch["be"], r_be)  # noqa: E731
  group = config.loss.ce_group.size if config.loss.ce == "listwise" else 0
  ce_fn = lambda p: ce_loss(model, p, batch["ce"], r_ce, group)  # noqa: E731
  metrics = {}
  if mode == "be":
    params, opt["main"], loss, metrics = _update(tx, be_fn, params, opt["main"], "")
  elif mode == "ce":
    params, opt["main"], loss, metrics = _update(tx, ce_fn, params, opt["main"], "")
  elif mode == "joint_alternate":
    params, opt["be"], l_be, m_be = _update(tx, be_fn, params, opt["be"], "be_")
    params, opt["ce"], l_ce, m_ce = _update(tx, ce_fn, params, opt["ce"], "ce_")
    loss, metrics = l_be + l_ce, {**m_be, **m_ce}
  elif mode == "joint_sum":
    def sum_fn(p):
      l_be, m_be = be_fn(p)
      l_ce, m_ce = ce_fn(p)
      return l_be + config.loss.ce_weight * l_ce, {**m_be, **m_ce}
    params, opt["main"], loss, metrics = _update(tx, sum_fn, params, opt["main"], "")
  elif mode == "separate":
    p_be, opt["be"], l_be, m_be = _update(tx, be_fn, params["be"], opt["be"], "be_")
    p_ce, opt["ce"], l_ce, m_ce = _update(tx, ce_fn, params["ce"], opt["ce"], "ce_")
    params, loss, metrics = {"be": p_be, "ce": p_ce}, l_be + l_ce, {**m_be, **m_ce}
  else:
    raise ValueError(f"config.mode: expected one of {retrieval.MODES}; found {mode!r}")
  metrics["loss"] = loss
  metrics["lr"] = schedule(config)(state["step"])
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt, "rng": rng}
  return new_state, metrics


def make_train_step(model, config, tx):
  return functools.partial(train_step, model, config, tx)
