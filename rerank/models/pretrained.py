"""Pretrained PyTorch checkpoints -> our Flax encoder parameters, and converted checkpoints back.

Reading: `.safetensors` through safetensors' numpy API (no torch); `.bin` / `.pt` / `.pth`
through `torch.load(weights_only=True)` only, so a checkpoint can never run code on load.
Mapping: each family (`convert_families.py`) lists (our parameter path, checkpoint key, kind);
`build_params` checks every key and shape against the encoder the checkpoint's config implies
and names everything missing, unexpected or mis-shaped in ONE error.

A converted checkpoint directory (written by `python -m rerank.convert`):
  model.json   family, EncoderConfig fields, special token ids, the conversion report
  params/      orbax checkpoint of {"encoder": <Encoder parameter tree>}
  tokenizer/   the checkpoint's tokenizer (tokenizer.json + transformers' config files)
"""

import dataclasses
import glob
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rerank import errors
from rerank.models import encoder as encoder_lib


class ConvertError(errors.UserError):
  """A checkpoint that cannot be converted; the message says which file/key and why."""


# Preferred first: safetensors needs no torch and cannot execute code.
_WEIGHT_PATTERNS = ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin", "*.pth", "*.pt")


def find_weights(src: str) -> list[str]:
  """The weights file(s) of a checkpoint directory (or `src` itself when it is a file).

  Sharded checkpoints (`*.index.json` with a weight_map, as save_pretrained writes them for
  large models) give all their shards.
  """
  if os.path.isfile(src):
    return [src]
  if not os.path.isdir(src):
    raise ConvertError(f"--src {src!r}: no such file or directory")
  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    path = os.path.join(src, index)
    if os.path.isfile(path):
      try:
        with open(path) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
      except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ConvertError(f"{path}: expected a JSON object with a weight_map ({e})") from e
      missing = [s for s in shards if not os.path.isfile(os.path.join(src, s))]
      if missing:
        raise ConvertError(f"{path}: shard(s) {', '.join(missing)} not found in {src}")
      return [os.path.join(src, s) for s in shards]
  for pattern in _WEIGHT_PATTERNS:
    found = sorted(glob.glob(os.path.join(src, pattern)))
    if found:
      return found[:1]
  raise ConvertError(f"--src {src!r}: no weights file found (looked for {', '.join(_WEIGHT_PATTERNS)})")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: float32 numpy array} from a safetensors or torch file (`{"model": ...}` unwrapped)."""
  if path.endswith(".safetensors"):
    return {k: _float32(v) for k, v in _read_safetensors(path)}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConvertError(f"{path}: reading PyTorch .bin/.pt files needs torch (pip install -e '.[torch]'),"
                       " or convert the file to .safetensors") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError on bad files
    raise ConvertError(f"{path}: cannot load with torch.load(weights_only=True) ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); the file may be truncated or hold "
                       "non-tensor objects") from e
  for wrapper in ("model", "state_dict", "module"):  # XLM/M3P-style training dumps
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  if not isinstance(state, dict):
    raise ConvertError(f"{path}: expected a state dict (key -> tensor); found {type(state).__name__}")
  out = {}
  for k, v in state.items():
    if isinstance(v, torch.Tensor):
      out[k] = _float32(v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy())
  return out


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(path: str):
  """Yields (key, array) from a .safetensors file, reading one tensor at a time.

  The format is an 8-byte little-endian header size, a JSON header {key: {dtype, shape,
  data_offsets}}, then raw little-endian buffers. Reading it directly keeps peak memory at one
  copy of the weights: safetensors' own numpy loader maps the file and copies every tensor,
  twice the checkpoint at its peak (measured with rerank.convert_benchmark). Tests check this
  reader against `safetensors.numpy.load_file`.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n < 0 or 8 + n > size:
      raise ConvertError(f"{path}: safetensors header claims {n} bytes but the file has {size}; "
                         "the file is truncated or not safetensors")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConvertError(f"{path}: unreadable safetensors header ({e}); the file may be truncated") from e
    header.pop("__metadata__", None)
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
      dtype = _ST_DTYPES.get(info.get("dtype"))
      if dtype is None:
        raise ConvertError(f"{path}: tensor {key}: unsupported dtype {info.get('dtype')!r}")
      if dtype == "bfloat16":
        import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency)
        dtype = ml_dtypes.bfloat16
      begin, end = info["data_offsets"]
      shape = tuple(info["shape"])
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      if end - begin != nbytes:
        raise ConvertError(f"{path}: tensor {key}: {end - begin} bytes for shape {shape} {info['dtype']}")
      if 8 + n + end > size:
        raise ConvertError(f"{path}: tensor {key} ends at byte {8 + n + end} but the file has {size}; "
                           "the file is truncated")
      out = np.empty(shape, dtype)
      f.seek(8 + n + begin)
      if f.readinto(out.reshape(-1).view(np.uint8)) != nbytes:
        raise ConvertError(f"{path}: tensor {key}: short read; the file is truncated")
      yield key, out


def _float32(x: np.ndarray) -> np.ndarray:
  return x if x.dtype == np.float32 or not np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


def normalise_keys(state: dict) -> dict:
  """Drops DataParallel's `module.` prefix and renames old-style LayerNorm gamma/beta."""
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  out = {}
  for k, v in state.items():
    head, _, last = k.rpartition(".")
    last = {"gamma": "weight", "beta": "bias"}.get(last, last)
    out[f"{head}.{last}" if head else last] = v
  return out


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: our path under the encoder, its checkpoint key, how to convert it.

  kind: "copy" (embeddings, LayerNorm; same shape), "weight" (torch Linear [out, in] ->
  kernel [in..., out...] with `n_in` input axes), "bias" (flat -> our shape).
  """
  path: tuple[str, ...]
  key: str
  kind: str = "copy"
  n_in: int = 1


def expected_shapes(cfg: encoder_lib.EncoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shape of every encoder parameter for `cfg`, computed abstractly (no memory)."""
  b, t, r = 1, 2, 2
  args = (jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), bool),
          jnp.zeros((b, r, cfg.feature_dim + cfg.box_dim), jnp.float32), jnp.ones((b, r), bool))
  tree = jax.eval_shape(lambda k: encoder_lib.Encoder(cfg).init(k, *args), jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree["params"]))[0]
  return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def _source_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  if entry.kind == "weight":
    return (int(np.prod(shape[entry.n_in:])), int(np.prod(shape[:entry.n_in])))
  if entry.kind == "bias":
    return (int(np.prod(shape)),)
  return shape


def _convert(entry: Entry, value: np.ndarray, shape) -> np.ndarray:
  if entry.kind == "weight":
    return np.ascontiguousarray(value.T).reshape(shape)
  return value.reshape(shape)


def _fresh(path: tuple[str, ...], shape, rng: np.random.Generator) -> np.ndarray:
  """BERT's init for a parameter the checkpoint does not have: N(0, 0.02) clipped at 2 std."""
  if path[-1] == "bias":
    return np.zeros(shape, np.float32)
  if path[-1] == "scale":
    return np.ones(shape, np.float32)
  return (np.clip(rng.standard_normal(shape), -2, 2) * 0.02).astype(np.float32)


def build_params(cfg, state: dict, entries: list[Entry], *, optional=(), ignored=(), fresh=(),
                 source: str = "checkpoint", seed: int = 0):
  """Checks `state` against `entries` and returns (encoder param tree, report).

  Args:
    cfg: the EncoderConfig the checkpoint's config implies.
    state: checkpoint key -> array (prefixes already stripped). Consumed (popped) to keep
      peak memory near one copy of the weights.
    entries: every parameter the checkpoint must provide.
    optional: keys that may be absent (freshly initialised and reported), e.g. a pooler.
    ignored: key prefixes of heads we do not use (reported, not an error).
    fresh: our path prefixes that are new by design for this family (e.g. BERT's region
      embedding), freshly initialised and reported.
  Raises:
    ConvertError listing every missing, unexpected and mis-shaped key.
  """
  shapes = expected_shapes(cfg)
  by_path = {e.path: e for e in entries}
  missing, mismatched, report_fresh = [], [], []
  for e in entries:
    if e.path not in shapes:
      raise AssertionError(f"converter bug: {e.path} is not an encoder parameter")
    if e.key not in state:
      if e.key not in optional:
        missing.append(e.key)
      continue
    want = _source_shape(e, shapes[e.path])
    if tuple(state[e.key].shape) != want:
      mismatched.append(f"{e.key}: checkpoint {tuple(state[e.key].shape)}, config implies {want}")
  used = {e.key for e in entries}
  ignored_keys = sorted(k for k in state if k not in used and k.startswith(tuple(ignored)))
  unexpected = sorted(k for k in state if k not in used and k not in ignored_keys)
  problems = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
    if items:
      shown = "; ".join(items[:20]) + (f"; ... ({len(items) - 20} more)" if len(items) > 20 else "")
      problems.append(f"{len(items)} {title} key(s): {shown}")
  if problems:
    raise ConvertError(f"{source}: does not match the {cfg.num_layers}-layer, {cfg.hidden_size}-wide "
                       f"encoder its config describes. " + " | ".join(problems))
  rng = np.random.default_rng(seed)
  tree, loaded = {}, 0
  for path, shape in sorted(shapes.items()):
    e = by_path.get(path)
    if e is not None and e.key in state:
      # Straight onto the device (host memory on CPU): orbax then writes without another copy.
      value = jax.device_put(_convert(e, state.pop(e.key), shape))
      loaded += 1
    else:
      if e is None and not any(path[:len(p)] == p for p in fresh):
        raise AssertionError(f"converter bug: {path} has no checkpoint key and is not new by design")
      value = jax.device_put(_fresh(path, shape, rng))
      report_fresh.append("/".join(path))
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree, {"loaded": loaded, "fresh": report_fresh, "ignored": _group(ignored_keys)}


def _group(keys: list[str]) -> dict[str, int]:
  """{"cls.predictions": 5, ...}: ignored keys counted by their first two name parts."""
  out = {}
  for k in keys:
    group = ".".join(k.split(".")[:2])
    out[group] = out.get(group, 0) + 1
  return out


# ------------------------------------------------------------------ converted checkpoints


def save_converted(dst_tmp: str, meta: dict, encoder_params, tokenizer) -> None:
  """Writes a converted checkpoint into `dst_tmp` (the caller renames it into place).

  `tokenizer`: a transformers tokenizer (its save_pretrained files) or a `tokenizers.Tokenizer`
  (tokenizer.json alone); either way `rerank.data.datasets.load_tokenizer` reads DIR/tokenizer/tokenizer.json.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  # Uncompressed: compression buffers a second copy of every tensor while writing (measured).
  handler = ocp.PyTreeCheckpointHandler(use_compression=False)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(os.path.join(os.path.abspath(dst_tmp), "params"), args=ocp.args.PyTreeSave(
        {"encoder": encoder_params}))
  tok_dir = os.path.join(dst_tmp, "tokenizer")
  if hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(tok_dir)
  else:
    os.makedirs(tok_dir)
    tokenizer.save(os.path.join(tok_dir, "tokenizer.json"))
  with open(os.path.join(dst_tmp, "model.json"), "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")


def check_destination(dst: str, flag: str = "--dst") -> None:
  """Raises ConvertError unless `dst` is absent or an empty directory."""
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise ConvertError(f"{flag} {dst!r} already exists; remove it or choose another directory")


def write_converted(dst: str, meta: dict, encoder_params, tokenizer) -> None:
  """save_converted into a temporary sibling of `dst`, then renamed: `dst` never exists half-written."""
  parent, name = os.path.split(os.path.abspath(dst))
  tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    save_converted(tmp, meta, encoder_params, tokenizer)
    if os.path.isdir(dst):
      os.rmdir(dst)  # empty (check_destination)
    os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "model.json")) and os.path.isdir(os.path.join(path, "params"))


def read_meta(path: str) -> dict:
  with open(os.path.join(path, "model.json")) as f:
    return json.load(f)


def encoder_config(meta: dict, **overrides) -> encoder_lib.EncoderConfig:
  return encoder_lib.EncoderConfig(**{**meta["encoder"], **overrides})


def load_encoder_params(path: str):
  """The {"embeddings": ..., "layer_0": ...} encoder tree of a converted checkpoint (numpy)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(os.path.abspath(path), "params"))
  return jax.tree_util.tree_map(np.asarray, tree["encoder"])

