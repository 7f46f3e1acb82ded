"""Image input of the pixel families (ViLT, BLIP): decode image files, resize and normalise.

Pillow and numpy only (no TensorFlow, no torch), so the per-host input path can run it.

- `load_image(path_or_bytes)` decodes one file into an 8-bit RGB `PIL.Image`, upright (EXIF
  orientation applied): grey, palette, CMYK, alpha (composited onto white, as the HF image
  processors do) and 16-bit images are converted; anything that cannot be decoded in full
  (not an image, truncated, over `MAX_PIXELS` pixels) raises `BadImage` naming the file.
- `ImageSpec` holds one family's preprocessing (`config.image`, and model.json's "image"):
  kind "vilt": the shorter side resized to `size`, the longer side capped at `max_size`, both
  rounded down to a multiple of `size_divisor`, then zero-padded at the bottom/right into a
  fixed canvas with a pixel mask; kind "blip": a square `size` x `size` resize. Both rescale
  by `rescale` (1/255) and normalise with `mean`/`std`.
- `preprocess(images, spec)` / `preprocess_array(uint8 [N, h, w, 3], spec)` ->
  (images [N, H, W, 3] float32, mask [N, H, W] bool), NHWC, the model's image input.

The arithmetic is the one of transformers' PIL-backend processors (ViltImageProcessorPil,
BlipImageProcessorPil): Pillow resizes the uint8 image, the result is scaled in float64 and
cast to float32, then normalised in float32, so outputs are equal to theirs bit for bit
(tests/test_images.py). One deliberate difference: ViLT pads every image to the same canvas
(the largest size the resize rule can produce, `ImageSpec.canvas`), not to the largest image
of the batch, so jitted shapes do not depend on the batch; the mask says which pixels are real.
"""

import dataclasses
import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rerank import errors

# Refuse images above this many pixels before decoding them: Pillow's own decompression-bomb
# threshold (a 9459 x 9459 image, ~270 MB as RGB). Tests patch it to a small value.
MAX_PIXELS = 89_478_485

# HF ViLT caps the longer side at 1333/800 of the shorter one (COCO's detection sizes).
VILT_LONGER_RATIO = 1333 / 800
VILT_MEAN = VILT_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP uses OpenAI CLIP's statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow filters by name; HF configs store them as Pillow's integer codes.
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
            "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
KINDS = ("vilt", "blip")


class BadImage(errors.UserError):
  """An image file that cannot be used: which file, and why (`kind` names the case for counts:
  "missing_image", "bad_image" or "huge_image")."""

  def __init__(self, name: str, reason: str, kind: str = "bad_image"):
    super().__init__(f"{name}: {reason}")
    self.name, self.reason, self.kind = name, reason, kind


# ----------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """How one family turns an RGB image into its image input (see the module docstring)."""

  kind: str                    # "vilt" or "blip"
  size: int                    # vilt: shorter side; blip: square side
  max_size: int = 0            # vilt: cap of the longer side (0: HF's int(1333 / 800 * size))
  size_divisor: int = 32       # vilt: both sides rounded down to a multiple of this
  mean: tuple = VILT_MEAN
  std: tuple = VILT_STD
  resample: str = "bicubic"    # a key of RESAMPLE
  rescale: float = 1 / 255

  def __post_init__(self):
    if self.kind == "vilt" and not self.max_size:
      object.__setattr__(self, "max_size", int(VILT_LONGER_RATIO * self.size))

  @property
  def canvas(self) -> tuple[int, int]:
    """(H, W) of the model input: every image is padded to it (vilt) or resized to it (blip)."""
    if self.kind == "blip":
      return self.size, self.size
    side = max(self.max_size // self.size_divisor * self.size_divisor, self.size_divisor)
    return side, side

  def resized(self, height: int, width: int) -> tuple[int, int]:
    """(h, w) an image of `height` x `width` pixels is resized to, before padding."""
    if self.kind == "blip":
      return self.size, self.size
    # HF's rule, in its float arithmetic: shorter side -> size, cap the longer, round, floor.
    scale = self.size / min(height, width)
    h, w = (self.size, scale * width) if height < width else (scale * height, self.size)
    if max(h, w) > self.max_size:
      cap = self.max_size / max(h, w)
      h, w = cap * h, cap * w
    d = self.size_divisor
    # HF would ask Pillow for a 0-pixel side (and fail) for images thinner than 1:20; one
    # divisor-wide strip keeps them usable.
    return max(int(h + 0.5) // d * d, d), max(int(w + 0.5) // d * d, d)

  @classmethod
  def from_dict(cls, d, where: str = "config.image") -> "ImageSpec":
    """An ImageSpec from its dict form (`to_dict`); errors.UserError naming the bad field."""
    if not hasattr(d, "get") or not hasattr(d, "keys"):
      raise errors.expected(where, "a dict of image preprocessing settings", type(d).__name__)
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise errors.expected(f"{where}.{unknown[0]}", f"one of the fields {sorted(known)}",
                            "an unknown field")
    kind = d.get("kind")
    if kind not in KINDS:
      raise errors.expected(f"{where}.kind", f"one of {list(KINDS)}", repr(kind))
    default_mean, default_std = (VILT_MEAN, VILT_STD) if kind == "vilt" else (CLIP_MEAN, CLIP_STD)
    vals = {"kind": kind, "size": _int(d, "size", where, None)}
    if kind == "vilt":
      vals["max_size"] = _int(d, "max_size", where, int(VILT_LONGER_RATIO * vals["size"]))
      vals["size_divisor"] = _int(d, "size_divisor", where, 32)
    vals["mean"] = _triple(d, "mean", where, default_mean, positive=False)
    vals["std"] = _triple(d, "std", where, default_std, positive=True)
    resample = d.get("resample", "bicubic")
    if resample not in RESAMPLE:
      raise errors.expected(f"{where}.resample", f"one of {sorted(RESAMPLE)}", repr(resample))
    vals["resample"] = resample
    rescale = d.get("rescale", 1 / 255)
    if (isinstance(rescale, bool) or not isinstance(rescale, (int, float))
        or not math.isfinite(rescale) or rescale <= 0):
      raise errors.expected(f"{where}.rescale", "a positive number (1/255 for 8-bit images)",
                            repr(rescale))
    vals["rescale"] = float(rescale)
    return cls(**vals)

  def to_dict(self) -> dict:
    """JSON-able dict; `from_dict(to_dict())` gives this spec back."""
    out = {"kind": self.kind, "size": self.size}
    if self.kind == "vilt":
      out.update(max_size=self.max_size, size_divisor=self.size_divisor)
    out.update(mean=list(self.mean), std=list(self.std), resample=self.resample,
               rescale=self.rescale)
    return out

  @classmethod
  def from_hf(cls, preprocessor_config: dict, kind: str,
              where: str = "preprocessor_config.json") -> "ImageSpec":
    """The spec of a HF `preprocessor_config.json` (ViltImageProcessor / BlipImageProcessor)."""
    c = preprocessor_config
    if kind not in KINDS:
      raise errors.expected("kind", f"one of {list(KINDS)}", repr(kind))
    if not c.get("do_resize", True):
      raise errors.expected(f"{where}: do_resize", "true (the models need a fixed input size)",
                            c.get("do_resize"))
    size = c.get("size", 384)
    if isinstance(size, dict):
      if kind == "vilt":
        size = size.get("shortest_edge")
      elif size.get("height") == size.get("width"):
        size = size.get("height")
      else:
        raise errors.expected(f"{where}: size", "a square height == width", size)
    d = {"kind": kind, "size": size}
    if kind == "vilt":
      d["size_divisor"] = c.get("size_divisor", 32)
      # HF derives the cap from the shorter side, in float arithmetic: 384 -> 639, not 640.
      d["max_size"] = int(VILT_LONGER_RATIO * size) if _is_int(size) else size
    default_mean, default_std = (VILT_MEAN, VILT_STD) if kind == "vilt" else (CLIP_MEAN, CLIP_STD)
    if c.get("do_normalize", True):
      d["mean"], d["std"] = c.get("image_mean", default_mean), c.get("image_std", default_std)
    else:
      d["mean"], d["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    d["rescale"] = c.get("rescale_factor", 1 / 255) if c.get("do_rescale", True) else 1.0
    codes = {int(v): k for k, v in RESAMPLE.items()}
    resample = c.get("resample", 3)
    d["resample"] = codes.get(resample, resample) if _is_int(resample) else resample
    return cls.from_dict(d, where)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int(d: dict, field: str, where: str, default):
  v = d.get(field, default)
  if not _is_int(v) or v < 1:
    raise errors.expected(f"{where}.{field}", "a positive integer", repr(v))
  return v


def _triple(d: dict, field: str, where: str, default, positive: bool) -> tuple:
  v = d.get(field, default)
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    v = (v,) * 3
  ok = (isinstance(v, (list, tuple)) and len(v) == 3
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and (x > 0 or not positive) for x in v))
  if not ok:
    what = "3 positive numbers (R, G, B)" if positive else "3 finite numbers (R, G, B)"
    raise errors.expected(f"{where}.{field}", what, repr(v))
  return tuple(float(x) for x in v)


def preprocess(images, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
  """RGB PIL images -> (images [N, H, W, 3] float32, mask [N, H, W] bool) on `spec.canvas`.

  Images of another mode are first converted as `load_image` would. Padding is 0 after
  normalisation (as HF pads) and False in the mask; BLIP's mask is all True.
  """
  return normalize([resize(im, spec) for im in images], spec)


def resize(image: Image.Image, spec: ImageSpec) -> np.ndarray:
  """One PIL image -> its resized pixels uint8 [h, w, 3] (`spec.resized`), before padding."""
  image = image if image.mode == "RGB" else to_rgb(image)
  h, w = spec.resized(image.height, image.width)
  return np.asarray(image.resize((w, h), resample=RESAMPLE[spec.resample]))


def normalize(pixels: list, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
  """Resized uint8 [h, w, 3] images (`resize`) -> (images [N, H, W, 3] float32, mask [N, H, W]
  bool): rescaled, normalised and padded into the canvas."""
  height, width = spec.canvas
  out = np.zeros((len(pixels), height, width, 3), np.float32)
  mask = np.zeros((len(pixels), height, width), bool)
  table = _value_table(spec)  # [3, 256]
  for i, p in enumerate(pixels):
    h, w = p.shape[:2]
    for c in range(3):
      out[i, :h, :w, c] = np.take(table[c], p[..., c])
    mask[i, :h, :w] = True
  return out, mask


def _value_table(spec: ImageSpec) -> np.ndarray:
  """[3, 256] float32: the normalised value of every uint8 level, per channel.

  Float64 scaling, a float32 cast, then float32 normalisation: HF's order of operations, hence
  its exact values, computed for 256 levels instead of for every pixel.
  """
  levels = (np.arange(256, dtype=np.float64) * spec.rescale).astype(np.float32)  # [256]
  mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
  return (levels[None, :] - mean[:, None]) / std[:, None]


def preprocess_array(pixels: np.ndarray, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
  """Decoded images uint8 [N, h, w, 3] -> (images [N, H, W, 3] float32, mask [N, H, W] bool)."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
    raise ValueError(f"preprocess_array: expected uint8 [N, h, w, 3] RGB pixels; found "
                     f"{pixels.dtype} {list(pixels.shape)}")
  return preprocess([Image.fromarray(p, "RGB") for p in pixels], spec)


# ----------------------------------------------------------------------------- decoding


@dataclasses.dataclass
class Decoded:
  """A decoded image and what was done to make it 8-bit RGB and upright."""

  image: Image.Image     # mode RGB
  format: str | None     # Pillow's name of the file format: "JPEG", "PNG", ...
  mode: str              # the file's mode before conversion ("CMYK", "I;16", ...)
  changes: list          # e.g. ["EXIF orientation 6 applied", "CMYK -> RGB"]; [] if none


def decode(src, name: str | None = None) -> Decoded:
  """Decodes an image file (path or bytes) in full; raises BadImage naming `name` (or the path).

  Deterministic: the same bytes give the same pixels.
  """
  if name is None:
    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<image bytes>"
  if isinstance(src, (str, os.PathLike)):
    if not os.path.isfile(src):
      raise BadImage(name, "no such file", kind="missing_image")
    with open(src, "rb") as f:  # bytes in memory: no file handle outlives the call
      src = f.read()
  try:
    with warnings.catch_warnings():
      # Pillow only warns between its limit and twice that; either way it is too big for us.
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(src))
      width, height = im.size  # from the header: nothing decoded yet
      if width * height > MAX_PIXELS:
        raise BadImage(name, f"expected at most {MAX_PIXELS} pixels; found {width} x {height} "
                       f"= {width * height}", kind="huge_image")
      im.load()  # decodes everything now, so a truncated file fails here, not later
      upright = _upright(im)
      changes = [] if upright is im else [f"EXIF orientation {im.getexif().get(0x0112)} applied"]
      if im.mode not in ("RGB", "L"):
        changes.append(f"{im.mode} -> RGB")
      return Decoded(to_rgb(upright), im.format, im.mode, changes)
  except BadImage:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadImage(name, f"expected at most {MAX_PIXELS} pixels; found more ({e})",
                   kind="huge_image") from None
  except UnidentifiedImageError:
    raise BadImage(name, "not an image file Pillow can read") from None
  except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
    # truncated data ("image file is truncated"), corrupt headers, unsupported codecs
    detail = (str(e).splitlines() or [type(e).__name__])[0]
    raise BadImage(name, f"cannot be decoded: {detail}") from None


def load_image(src, name: str | None = None) -> Image.Image:
  """An image file (path or bytes) as an upright 8-bit RGB PIL image; see `decode`."""
  return decode(src, name).image


def _upright(im: Image.Image) -> Image.Image:
  """`im` turned as its EXIF orientation tag says (the same object when nothing is to do)."""
  try:
    orientation = im.getexif().get(0x0112, 1)
  except Exception:  # pylint: disable=broad-except  # an unreadable EXIF block: no orientation
    return im
  if orientation in (None, 1) or orientation not in range(2, 9):
    return im
  return ImageOps.exif_transpose(im)


def to_rgb(im: Image.Image) -> Image.Image:
  """Any Pillow mode -> 8-bit RGB: alpha composited onto white (as HF's convert_to_rgb), 16-
  and 32-bit integer images scaled from 0..65535 to 0..255, float images clipped to 0..255."""
  if im.mode == "RGB":
    return im
  if im.mode.startswith("I") or im.mode == "F":
    values = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and values.max(initial=0) > 255):
      values = np.clip(values.astype(np.int64), 0, 65535)
      values = (values * 255 + 32767) // 65535  # round to nearest: 65535 -> 255, 257 -> 1
    grey = np.clip(np.rint(values) if im.mode == "F" else values, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
  if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return im.convert("RGB")

