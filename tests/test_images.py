"""images: decoding (bad and unusual files) and preprocessing equal to HF's PIL-backend processors.

Parity is exact (assert_array_equal), not within a grey level: both sides resize the same uint8
image with the same Pillow filter, scale in float64, cast to float32 and normalise in float32.
HF returns NCHW padded to the batch's largest image; ours is NHWC on the fixed canvas, so the
comparison transposes and checks that everything outside HF's batch canvas is padding.
"""

import io

import numpy as np
import pytest
from PIL import Image

from rerank import errors
from rerank.data import images

SIZES = [(48, 64), (64, 48), (37, 91), (100, 100), (23, 230), (300, 41)]  # (h, w)


def _random_images(sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _check_vilt(hf, spec, ims):
  got, mask = images.preprocess(ims, spec)
  want = hf(images=ims, return_tensors="np")
  pixels, pixel_mask = want["pixel_values"].transpose(0, 2, 3, 1), want["pixel_mask"].astype(bool)
  h, w = pixels.shape[1:3]
  assert got.shape == (len(ims), *spec.canvas, 3) and mask.shape == (len(ims), *spec.canvas)
  np.testing.assert_array_equal(got[:, :h, :w], pixels)
  np.testing.assert_array_equal(mask[:, :h, :w], pixel_mask)
  assert not got[:, h:].any() and not got[:, :, w:].any()
  assert not mask[:, h:].any() and not mask[:, :, w:].any()


def test_vilt_equals_hf_processor():
  vilt = pytest.importorskip("transformers.models.vilt.image_processing_pil_vilt")
  hf = vilt.ViltImageProcessorPil()  # the defaults of the public ViLT checkpoints: 384 / 32
  spec = images.ImageSpec.from_hf(hf.to_dict(), "vilt")
  assert (spec.size, spec.max_size, spec.size_divisor, spec.canvas) == (384, 639, 32, (608, 608))
  _check_vilt(hf, spec, _random_images())
  # a small canvas with another divisor and filter, as a tiny demo model would use
  hf = vilt.ViltImageProcessorPil(size={"shortest_edge": 40}, size_divisor=8, resample=2)
  spec = images.ImageSpec.from_hf(hf.to_dict(), "vilt")
  assert (spec.max_size, spec.resample, spec.canvas) == (66, "bilinear", (64, 64))
  # (23, 230) would shrink to 0 pixels on this canvas (HF fails there; see the thin-image test)
  _check_vilt(hf, spec, _random_images([s for s in SIZES if s != (23, 230)], seed=1))


def test_blip_equals_hf_processor():
  blip = pytest.importorskip("transformers.models.blip.image_processing_pil_blip")
  for hf in (blip.BlipImageProcessorPil(),
             blip.BlipImageProcessorPil(size={"height": 48, "width": 48}, resample=2)):
    spec = images.ImageSpec.from_hf(hf.to_dict(), "blip")
    ims = _random_images()
    got, mask = images.preprocess(ims, spec)
    want = hf(images=ims, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)
    assert mask.shape == want.shape[:3] and mask.all()


def test_from_hf_reads_legacy_configs():
  # the preprocessor_config.json of the 2021 ViLT checkpoints (feature-extractor era)
  legacy = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViltFeatureExtractor",
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
            "size": 384, "size_divisor": 32}
  spec = images.ImageSpec.from_hf(legacy, "vilt")
  assert spec.to_dict() == {"kind": "vilt", "size": 384, "max_size": 639, "size_divisor": 32,
                            "mean": [0.5] * 3, "std": [0.5] * 3, "resample": "bicubic",
                            "rescale": 1 / 255}
  plain = images.ImageSpec.from_hf({"size": {"height": 64, "width": 64}, "do_normalize": False},
                                   "blip")
  assert (plain.mean, plain.std, plain.canvas) == ((0.0,) * 3, (1.0,) * 3, (64, 64))
  with pytest.raises(errors.UserError, match=r"size: expected a square"):
    images.ImageSpec.from_hf({"size": {"height": 64, "width": 32}}, "blip")


def test_spec_dict_round_trip_and_errors_name_the_field():
  for d in (dict(kind="vilt", size=384, max_size=640, size_divisor=32, mean=[.5] * 3,
                 std=[.5] * 3, resample="bicubic"),
            dict(kind="blip", size=384, mean=list(images.CLIP_MEAN), std=list(images.CLIP_STD),
                 resample="bicubic")):
    spec = images.ImageSpec.from_dict(d)
    assert images.ImageSpec.from_dict(spec.to_dict()) == spec
    assert {k: spec.to_dict()[k] for k in d} == d
  assert images.ImageSpec.from_dict(dict(kind="vilt", size=384)).canvas == (608, 608)
  assert images.ImageSpec.from_dict(dict(kind="vilt", size=384, max_size=640)).canvas == (640, 640)
  bad = [(dict(kind="clip", size=3), "config.image.kind: expected one of"),
         (dict(kind="vilt", size=0), "config.image.size: expected a positive integer"),
         (dict(kind="vilt", size=32, size_divisor=2.5), "config.image.size_divisor"),
         (dict(kind="blip", size=32, mean=[0.5, 0.5]), "config.image.mean: expected 3"),
         (dict(kind="blip", size=32, std=[1, 0, 1]), "config.image.std: expected 3 positive"),
         (dict(kind="blip", size=32, resample="cubic"), "config.image.resample: expected one of"),
         (dict(kind="blip", size=32, rescale=-1), "config.image.rescale"),
         (dict(kind="blip", size=32, crop=True), "config.image.crop: expected one of the fields")]
  for d, message in bad:
    with pytest.raises(errors.UserError, match=message):
      images.ImageSpec.from_dict(d)


def test_vilt_resize_rule_and_thin_images():
  spec = images.ImageSpec.from_dict(dict(kind="vilt", size=384))  # max_size 639
  assert spec.resized(480, 640) == (384, 512)
  assert spec.resized(384, 640) == (352, 608)   # 640 > 639: capped, then floored to 32
  assert spec.resized(1000, 500) == (608, 320)  # 384 x 768, capped to 319.5 x 639, floored
  # 1:40 would floor the short side to 0 pixels (HF fails there); one divisor strip instead
  assert spec.resized(10, 400) == (32, 608)
  got, mask = images.preprocess(_random_images([(10, 400)]), spec)
  assert mask[0].sum() == 32 * 608 and mask[0, :32, :608].all()


def test_preprocess_array_equals_preprocess_of_pil():
  spec = images.ImageSpec.from_dict(dict(kind="vilt", size=24, max_size=40, size_divisor=8))
  pixels = np.random.default_rng(3).integers(0, 256, (3, 30, 50, 3), dtype=np.uint8)
  got, mask = images.preprocess_array(pixels, spec)
  want, want_mask = images.preprocess([Image.fromarray(p) for p in pixels], spec)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(mask, want_mask)
  assert got.shape == (3, 40, 40, 3) and mask[:, :24, :40].all() and not mask[:, 24:].any()
  with pytest.raises(ValueError, match=r"uint8 \[N, h, w, 3\]"):
    images.preprocess_array(pixels.astype(np.float32), spec)
  empty, empty_mask = images.preprocess_array(np.zeros((0, 8, 8, 3), np.uint8), spec)
  assert empty.shape == (0, 40, 40, 3) and empty_mask.shape == (0, 40, 40)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def test_load_image_converts_modes_to_8bit_rgb():
  rgb = np.random.default_rng(4).integers(0, 256, (6, 8, 3), dtype=np.uint8)
  # 16-bit grey: 0..65535 scaled to 0..255 with rounding, not clipped at 255
  grey16 = np.array([[0, 128, 257, 32767, 65535, 1000]], np.uint16)
  got = images.decode(_encode(Image.fromarray(grey16), "PNG"))
  assert got.mode.startswith("I") and got.changes == [f"{got.mode} -> RGB"]
  np.testing.assert_array_equal(np.asarray(got.image)[..., 0], [[0, 0, 1, 127, 255, 4]])
  assert got.image.mode == "RGB"
  # alpha composited onto white, as HF's convert_to_rgb
  rgba = np.concatenate([rgb, np.full((6, 8, 1), 255, np.uint8)], -1)
  rgba[0, 0, 3], rgba[0, 1, 3] = 0, 128
  out = np.asarray(images.load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(out[1:], rgb[1:])
  # palette and grey images
  pal = Image.fromarray(rgb).quantize(8)
  np.testing.assert_array_equal(np.asarray(images.load_image(_encode(pal, "PNG"))),
                                np.asarray(pal.convert("RGB")))
  grey = images.decode(_encode(Image.fromarray(rgb[..., 0]), "PNG"))
  assert grey.changes == [] and np.asarray(grey.image).shape == (6, 8, 3)
  # CMYK JPEG: Pillow's CMYK -> RGB of the decoded pixels
  cmyk = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
  got = images.decode(cmyk, "photo.jpg")
  assert got.mode == "CMYK" and got.changes == ["CMYK -> RGB"]
  np.testing.assert_array_equal(np.asarray(got.image),
                                np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")))


def test_load_image_applies_exif_orientation():
  pixels = np.random.default_rng(5).integers(0, 256, (6, 8, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 clockwise to display"
  got = images.decode(_encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes()))
  assert got.changes == ["EXIF orientation 6 applied"]
  np.testing.assert_array_equal(np.asarray(got.image), np.rot90(pixels, k=-1))


def test_bad_images_name_the_file(tmp_path, monkeypatch):
  good = _encode(Image.fromarray(np.zeros((40, 50, 3), np.uint8) + 90), "JPEG")
  cases = {"truncated.jpg": (good[:len(good) // 2], "bad_image", "cannot be decoded"),
           "notes.jpg": (b"these are not pixels", "bad_image", "not an image file")}
  for name, (data, kind, message) in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(images.BadImage, match=message) as e:
      images.load_image(str(tmp_path / name))
    assert e.value.kind == kind and str(e.value).startswith(str(tmp_path / name) + ": ")
  with pytest.raises(images.BadImage, match="no such file") as e:
    images.load_image(str(tmp_path / "gone.jpg"))
  assert e.value.kind == "missing_image"
  # huge: the header is enough to refuse it; nothing large is allocated
  monkeypatch.setattr(images, "MAX_PIXELS", 40 * 50 - 1)
  with pytest.raises(images.BadImage, match="expected at most 1999 pixels; found 50 x 40") as e:
    images.load_image(good, "big.jpg")
  assert e.value.kind == "huge_image" and isinstance(e.value, errors.UserError)
  # past Pillow's own decompression-bomb limit (it raises before we look at the size)
  monkeypatch.setattr(images, "MAX_PIXELS", 10**9)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(images.BadImage, match="big.jpg: expected at most") as e:
    images.load_image(good, "big.jpg")
  assert e.value.kind == "huge_image"
