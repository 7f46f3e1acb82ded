"""Pretrained PyTorch checkpoints -> our Flax encoder parameters, and converted checkpoints back.

Reading: `.safetensors` through our reader, which checks the header as the safetensors library
does (no torch); `.bin` / `.pt` / `.pth` through `torch.load(weights_only=True)` only, with a
torch recent enough that this cannot be bypassed, so a checkpoint can never run code on load.
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
import math
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rerank import errors
from rerank.models import encoder as encoder_lib
from rerank.models import pixels


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
      except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ConvertError(f"{path}: expected a JSON object with a weight_map ({e})") from e
      # A shard is a file of `src`: a weight_map cannot send the reader elsewhere.
      outside = [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s
                 or s in ("", ".", "..")]
      if outside:
        raise ConvertError(f"{path}: weight_map: expected file names in {src}; found {outside[0]!r:.80}")
      missing = [s for s in shards if not os.path.isfile(os.path.join(src, s))]
      if missing:
        raise ConvertError(f"{path}: shard(s) {', '.join(missing)} not found in {src}")
      return [os.path.join(src, s) for s in shards]
  for pattern in _WEIGHT_PATTERNS:
    found = sorted(glob.glob(os.path.join(src, pattern)))
    if found:
      return found[:1]
  raise ConvertError(f"--src {src!r}: no weights file found (looked for {', '.join(_WEIGHT_PATTERNS)})")


# torch.load(weights_only=True) of older versions can be made to run code (advisories for
# <= 2.5.1 and < 2.10); setup.py's `torch` extra pins the same floor.
TORCH_MIN_VERSION = (2, 10)


def torch_version_ok(version: str) -> bool:
  """Whether a torch version string ("2.10.0", "2.13.0+cpu", "2.10.0a0+git...") is >= the floor."""
  m = re.match(r"(\d+)\.(\d+)", version)
  return bool(m) and (int(m.group(1)), int(m.group(2))) >= TORCH_MIN_VERSION


def import_safe_torch(path: str):
  """torch, once its version is known to load `weights_only=True` safely; else ConvertError."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConvertError(f"{path}: reading PyTorch .bin/.pt files needs torch (pip install -e '.[torch]'),"
                       " or convert the file to .safetensors") from e
  if not torch_version_ok(torch.__version__):
    floor = ".".join(map(str, TORCH_MIN_VERSION))
    raise ConvertError(f"{path}: reading PyTorch files safely needs torch >= {floor} (older versions' "
                       f"weights_only loader can be made to run code); found torch {torch.__version__}: "
                       f"pip install -U 'torch>={floor}', or convert the file to .safetensors")
  return torch


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: float32 numpy array} from a safetensors or torch file (`{"model": ...}` unwrapped)."""
  if path.endswith(".safetensors"):
    return {k: _float32(v) for k, v in _read_safetensors(path)}
  torch = import_safe_torch(path)
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
_ST_MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit


@dataclasses.dataclass(frozen=True)
class _StTensor:
  """One tensor of a safetensors header, checked: where its bytes are and what they hold."""
  key: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # byte offsets into the data buffer (after the header)
  end: int


def _st_dtype(name) -> np.dtype | None:
  dtype = _ST_DTYPES.get(name) if isinstance(name, str) else None
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency)
    dtype = ml_dtypes.bfloat16
  return None if dtype is None else np.dtype(dtype)


def _st_tensor(path: str, key: str, info) -> _StTensor:
  """Checks one header entry as the safetensors library does; ConvertError names the tensor."""
  where = f"{path}: tensor {key!r}"
  if not isinstance(info, dict):
    raise ConvertError(f"{where}: expected an object with dtype, shape, data_offsets; found "
                       f"{type(info).__name__}")
  missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
  if missing:
    raise ConvertError(f"{where}: expected dtype, shape and data_offsets; missing {', '.join(missing)}")
  dtype = _st_dtype(info["dtype"])
  if dtype is None:
    raise ConvertError(f"{where}: dtype: expected one of {', '.join(_ST_DTYPES)}; found {info['dtype']!r}")
  shape, offsets = info["shape"], info["data_offsets"]
  is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
  if not isinstance(shape, list) or not all(is_count(d) for d in shape):
    raise ConvertError(f"{where}: shape: expected a list of non-negative integers; found {shape!r}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
          and offsets[0] <= offsets[1]):
    raise ConvertError(f"{where}: data_offsets: expected [begin, end] with 0 <= begin <= end; "
                       f"found {offsets!r}")
  nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a huge shape cannot wrap around
  if offsets[1] - offsets[0] != nbytes:
    raise ConvertError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but shape "
                       f"{shape} {info['dtype']} needs {nbytes}")
  return _StTensor(key, dtype, tuple(shape), offsets[0], offsets[1])


def read_safetensors_header(path: str) -> tuple[int, list[_StTensor]]:
  """(byte offset of the data buffer, tensors in file order) of a .safetensors file, checked.

  The format is an 8-byte little-endian header size, a JSON header {key: {dtype, shape,
  data_offsets}, "__metadata__": {str: str}}, then the raw little-endian buffers. As the
  safetensors library requires, the tensors must tile the buffer exactly: the first starts at 0,
  each starts where the previous ends, the last ends at the end of the file. So no tensor can
  read the header, overlap another or point past the file. Raises ConvertError naming the file
  and, where one is to blame, the tensor.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n < 0 or 8 + n > size or n > _ST_MAX_HEADER:
      raise ConvertError(f"{path}: safetensors header claims {n} bytes but the file has {size}; "
                         "the file is truncated or not safetensors")
    text = f.read(n)
  try:
    header = json.loads(text.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConvertError(f"{path}: unreadable safetensors header ({e}); the file may be truncated") from e
  if not isinstance(header, dict):
    raise ConvertError(f"{path}: safetensors header: expected a JSON object; found {type(header).__name__}")
  metadata = header.pop("__metadata__", None)
  if metadata is not None and not (isinstance(metadata, dict)
                                   and all(isinstance(v, str) for v in metadata.values())):
    raise ConvertError(f"{path}: safetensors __metadata__: expected an object of strings; "
                       f"found {metadata!r:.80}")
  tensors = sorted((_st_tensor(path, k, v) for k, v in header.items()), key=lambda t: (t.begin, t.end))
  pos = 0
  for t in tensors:
    if t.begin != pos:
      raise ConvertError(f"{path}: tensor {t.key!r}: data_offsets [{t.begin}, {t.end}] "
                         f"{'overlap the previous tensor' if t.begin < pos else 'leave a gap'} "
                         f"(expected it to start at {pos})")
    pos = t.end
  if 8 + n + pos != size:
    raise ConvertError(f"{path}: tensors end at byte {8 + n + pos} but the file has {size} bytes; "
                       "the file is truncated or has trailing data")
  return 8 + n, tensors


def _read_safetensors(path: str):
  """Yields (key, array) from a .safetensors file, reading one tensor at a time.

  Reading it directly keeps peak memory at one copy of the weights: safetensors' own numpy
  loader maps the file and copies every tensor, twice the checkpoint at its peak (measured with
  rerank.convert_benchmark). The header is checked first (`read_safetensors_header`); tests
  check this reader against `safetensors.numpy.load_file`.
  """
  start, tensors = read_safetensors_header(path)
  with open(path, "rb") as f:
    for t in tensors:
      out = np.empty(t.shape, t.dtype)
      f.seek(start + t.begin)
      if f.readinto(out.reshape(-1).view(np.uint8)) != t.end - t.begin:
        raise ConvertError(f"{path}: tensor {t.key!r}: short read; the file is truncated")
      yield t.key, out


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


def read_json_object(path: str) -> dict:
  """The JSON object in file `path` (a checkpoint's config); ConvertError naming the file otherwise."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConvertError(f"{path}: cannot read JSON ({e})") from e
  if not isinstance(value, dict):
    raise ConvertError(f"{path}: expected a JSON object; found {type(value).__name__}")
  return value


def key_problems(missing, unexpected, mismatched) -> list[str]:
  """The parts of a checkpoint-mismatch error: "N missing key(s): a; b" etc., 20 names each."""
  problems = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
    if items:
      shown = "; ".join(items[:20]) + (f"; ... ({len(items) - 20} more)" if len(items) > 20 else "")
      problems.append(f"{len(items)} {title} key(s): {shown}")
  return problems


def build_params(cfg, state: dict, entries: list[Entry], *, optional=(), ignored=(), fresh=(),
                 source: str = "checkpoint", seed: int = 0, shapes: dict | None = None):
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
    shapes: our parameter path -> shape; default: the region encoder's for `cfg` (a pixel
      family passes its whole model's).
  Raises:
    ConvertError listing every missing, unexpected, mis-shaped and non-finite (NaN/inf) key.
  """
  shapes = expected_shapes(cfg) if shapes is None else shapes
  by_path = {e.path: e for e in entries}
  missing, mismatched, nonfinite, report_fresh = [], [], [], []
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
    elif not np.isfinite(state[e.key]).all():
      bad = int(np.size(state[e.key]) - np.isfinite(state[e.key]).sum())
      nonfinite.append(f"{e.key} ({bad} of {np.size(state[e.key])} values)")
  used = {e.key for e in entries}
  ignored_keys = sorted(k for k in state if k not in used and k.startswith(tuple(ignored)))
  unexpected = sorted(k for k in state if k not in used and k not in ignored_keys)
  problems = key_problems(missing, unexpected, mismatched)
  if problems:
    raise ConvertError(f"{source}: does not match the {cfg.num_layers}-layer, {cfg.hidden_size}-wide "
                       f"encoder its config describes. " + " | ".join(problems))
  if nonfinite:
    raise ConvertError(f"{source}: expected finite weights; found NaN or inf in {len(nonfinite)} "
                       f"tensor(s): {'; '.join(nonfinite[:20])}")
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
  """model.json of a converted checkpoint, its encoder config checked; ConvertError naming it."""
  file = os.path.join(path, "model.json")
  try:
    with open(file, encoding="utf-8") as f:
      meta = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConvertError(f"{file}: expected the JSON that python -m rerank.convert writes; found "
                       f"invalid JSON ({e})") from e
  if isinstance(meta, dict) and meta.get("family") in pixels.FAMILIES:
    _check_pixel_meta(file, meta)
    return meta
  if not isinstance(meta, dict) or not isinstance(meta.get("encoder"), dict):
    raise ConvertError(f"{file}: expected an object with an \"encoder\" object (the encoder config); "
                       f"found {json.dumps(meta)[:80]}")
  _check_encoder_fields(file, meta["encoder"])
  return meta


def _check_pixel_meta(file: str, meta: dict) -> None:
  """ConvertError unless a pixel family's model.json has a "model" its Config accepts."""
  if not isinstance(meta.get("model"), dict):
    raise ConvertError(f"{file}: expected an object with a \"model\" object (the {meta['family']} "
                       f"config); found {json.dumps(meta)[:80]}")
  try:
    pixels.module(meta["family"]).Config.from_dict(meta["model"])
  except (TypeError, ValueError) as e:
    raise ConvertError(f"{file}: model: {e}") from e


def _field_ok(kind, value) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind == (float | None):
    return value is None or _field_ok(float, value)
  return isinstance(value, kind)


def _check_encoder_fields(file: str, fields: dict) -> None:
  """ConvertError naming the first encoder field of model.json that EncoderConfig cannot take."""
  kinds = {f.name: f.type for f in dataclasses.fields(encoder_lib.EncoderConfig)}
  for name, value in fields.items():
    if name not in kinds:
      raise ConvertError(f"{file}: encoder.{name}: expected one of the encoder's fields "
                         f"({', '.join(kinds)}); found an unknown field")
    if not _field_ok(kinds[name], value):
      want = getattr(kinds[name], "__name__", str(kinds[name]))
      raise ConvertError(f"{file}: encoder.{name}: expected {want}; found {json.dumps(value)[:80]}")
  try:
    encoder_lib.EncoderConfig(**fields)
  except (TypeError, ValueError) as e:  # a required field missing, or a value out of range
    raise ConvertError(f"{file}: encoder: {e}") from e


def encoder_config(meta: dict, **overrides) -> encoder_lib.EncoderConfig:
  return encoder_lib.EncoderConfig(**{**meta["encoder"], **overrides})


def load_encoder_params(path: str):
  """The {"embeddings": ..., "layer_0": ...} encoder tree of a converted checkpoint (numpy)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(os.path.abspath(path), "params"))
  return jax.tree_util.tree_map(np.asarray, tree["encoder"])

