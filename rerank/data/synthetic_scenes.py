"""synthetic_scenes: a generated image-text retrieval dataset (no download).

Images are sets of detector regions (2048-d feature + 6 box values) with 5 captions each,
split like Flickr30k, so retrieve-and-rerank trains and evaluates on a CPU in minutes. It is
built so that a mean-pooled bi-encoder is at a disadvantage against a cross-encoder: telling
near-identical scenes apart needs binding attributes to the right object and relations to
the right pair, which word-region attention can do and a mean over regions cannot.

Generative process (deterministic given ``(split, seed)``)
------------------------------------------------------------
1. Objects. Shape (8: cube ... star), colour (8), material (4: metal, rubber, glass, wooden),
   size (3: small, medium, large). A base scene has ``min_objects..max_objects`` (<= 9) objects with
   uniform random attributes (no two identical), each in its own cell of a 3x3 grid over a
   640x480 image, centre jittered by up to 8% of a cell. Box side is 0.40 / 0.60 / 0.78 of the
   cell side for small / medium / large (+-5% per axis): size is visible in the box and boxes
   never leave their cell. Boxes are whole pixels, stored as
   ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H]``.
2. Families. Scenes come in families of ``family_size`` consecutive rows: the base plus
   variants, each ONE edit of the base: swap the colour or material of two objects (binding),
   swap the positions of two objects (relation), or change one attribute of one object. All
   members share the family's grid positions and differ as (position, attributes) sets.
3. Detector. One region per object, in random order (position must be read from the box).
   Feature = sum of four fixed random vectors, one per attribute value (entries N(0, 1/4),
   drawn once from ``DETECTOR_SEED`` for every split), so clean entries have std 1, plus
   Gaussian noise of per-entry std ``noise_std`` (default 0.75: noise norm = 0.75x signal
   norm; attributes stay linearly recoverable). The noise of region slot ``s`` of image ``id``
   is a window of a fixed Gaussian tape at an offset hashed from ``(seed, id, s)``: independent
   of call order and batch, and a gather instead of a per-image RNG. Without noise the mean of
   the attribute part over regions is unchanged by any swap edit: a mean-pooled encoder
   cannot see the difference, cross-attention can.
4. Captions. A caption states facts: 1-3 described objects (colour + shape always, size and
   material each with p=0.4) and, for 2+ objects, relations (left of, right of, above, below)
   between described pairs, read from box centres and stated only when unambiguous (centres
   at least half a cell apart on that axis). Templates: "a small red metal cube left of a blue
   sphere.", "a red cube left of a blue sphere, and a green torus above the cube.", "a red
   cube, a blue sphere and a green torus; the cube is left of the sphere and ...". A caption
   is kept only if true of its image and false of every sibling in its family (true: distinct
   objects match the descriptions and all relations hold, see ``facts_hold``); in dev and test
   (``unique_captions``), false of every other image of the split, so each caption has exactly
   one correct image (short captions like "a black torus." are otherwise true of dozens). After
   40 failed samples the fewest fully described objects whose relations discriminate are used,
   with redundant relations and optional attributes greedily dropped. A scene whose objects
   and relations all recur in a larger scene of the split has no such caption (2 of the 1,000
   test images): it keeps the fully described one. Sampled captions have at most
   ``MAX_TOKENS`` words + punctuation marks; lowercase words and ``, ; .`` only (see
   ``vocabulary``).

``parse_caption`` inverts the grammar, so any caption can be checked against any image.

Pixels (``render``, ``write_images``)
-------------------------------------
The same scenes as small RGB images, for the pixel families (ViLT, BLIP): every object drawn
in its box (the box scaled to a square ``size`` x ``size`` canvas) on a mid-grey background,
which keeps white and black objects visible. Shape = a silhouette (cube: square, sphere: disc,
cylinder: narrow upright bar with round ends, cone: narrow triangle on a round base, torus:
thick ring, pyramid: wide triangle, ring: thin ring, star: five points); colour = its fill;
material = its surface: rubber flat, metal shaded with a white highlight, glass half
transparent with a light rim, wooden striped. Drawn 4x supersampled and averaged down, so
small objects keep their silhouettes. A faint per-pixel noise (std ``PIXEL_NOISE`` grey levels)
is drawn from ``(seed, image id)``: an image is the same whichever batch renders it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
import random
import re

import numpy as np
import tokenizers
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw, ImageFilter
from tokenizers import models, normalizers, pre_tokenizers, processors

from rerank import errors

SPLIT_SIZES = {"train": 29000, "dev": 1014, "test": 1000}  # images, like Flickr30k
CAPTIONS_PER_IMAGE = 5
FEATURE_DIM = 2048
BOX_DIM = 6
REGION_DIM = FEATURE_DIM + BOX_DIM  # 2054
MAX_REGIONS = 4  # default max objects per scene (= regions per image)
GRID_CELLS = 9  # 3x3 grid, one object per cell: the most objects a scene can hold
IMAGE_W, IMAGE_H = 640, 480
DETECTOR_SEED = 20220302
DEFAULT_NOISE_STD = 0.75
MAX_TOKENS = 30  # words + punctuation of a sampled caption; 32 with [CLS] and [SEP]
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

SHAPES = ("cube", "sphere", "cylinder", "cone", "torus", "pyramid", "ring", "star")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
MATERIALS = ("metal", "rubber", "glass", "wooden")
SIZES = ("small", "medium", "large")
ATTRIBUTES = (SHAPES, COLOURS, MATERIALS, SIZES)  # column order of Scenes.attributes
RELATIONS = ("left", "right", "above", "below")
_INVERSE = (1, 0, 3, 2)
_ATTR_OFFSET = np.cumsum([0] + [len(v) for v in ATTRIBUTES[:-1]])  # rows of the detector table
_SIZE_FRACTION = np.array([0.40, 0.60, 0.78])
_CENTRE_JITTER, _EXTENT_JITTER = 0.08, 0.05  # 0.78 * 1.05 / 2 + 0.08 < 0.5: boxes stay in cell
_MARGIN = 0.5 / 3  # centre gaps: same row/column <= 0.16 cell, different >= 0.84 cell
_TAPE_LEN = 1 << 22
_TRIES = 40
_PREFIXES = ("", "", "there is ", "we see ", "a scene with ", "a picture of ")
_FILLER = ("a", "an", "the", "is", "and", "to", "of", "there", "we", "see", "scene", "with",
           "picture")
_WORD_RE = re.compile(r"[a-z]+|[,;.]")
_ATTR_WORD = {w: (col, v) for col, values in enumerate(ATTRIBUTES) for v, w in enumerate(values)}


# ---------------------------------------------------------------- facts
@dataclasses.dataclass(frozen=True)
class Facts:
  """What a caption asserts. Objects are in mention order."""
  objects: tuple[tuple[int, int, int, int], ...]  # (shape, colour, material|-1, size|-1)
  relations: tuple[tuple[int, int, int], ...]  # sorted (i, j, r), i < j: i is RELATIONS[r] of j


def _facts(objects, rels) -> Facts:
  rels = {(i, j, r) if i < j else (j, i, _INVERSE[r]) for i, j, r in rels}
  return Facts(tuple(objects), tuple(sorted(rels)))


def _axes(ci, cj) -> list[int]:
  """Relations of centre ci to centre cj that hold unambiguously."""
  out = [] if abs(ci[0] - cj[0]) <= _MARGIN else [0 if ci[0] < cj[0] else 1]
  return out if abs(ci[1] - cj[1]) <= _MARGIN else out + [2 if ci[1] < cj[1] else 3]


def _holds(f: Facts, attrs, centres) -> bool:
  cands = []
  for d in f.objects:
    c = [o for o, a in enumerate(attrs) if a[0] == d[0] and a[1] == d[1]
         and d[2] in (-1, a[2]) and d[3] in (-1, a[3])]
    if not c:  # the common early exit keeps generation fast
      return False
    cands.append(c)
  return any(len(set(objs)) == len(objs) and all(
      r in _axes(centres[objs[i]], centres[objs[j]]) for i, j, r in f.relations)
      for objs in itertools.product(*cands))


def facts_hold(facts: Facts, attributes: np.ndarray, boxes: np.ndarray) -> bool:
  """Whether `facts` are true of one image: attributes [R, 4] (-1 padded), boxes [R, 6]."""
  valid = attributes[:, 0] >= 0
  centres = np.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], -1) / 2
  return _holds(facts, attributes[valid].tolist(), centres[valid].tolist())


# ---------------------------------------------------------------- facts <-> text
def _noun_phrase(d) -> str:
  words = [SIZES[d[3]]] * (d[3] >= 0) + [COLOURS[d[1]]] + [MATERIALS[d[2]]] * (d[2] >= 0)
  return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words + [SHAPES[d[0]]])


def _reference(objects, i) -> str:
  # shortest phrase parse_caption resolves back to i, given distinct objects
  d = objects[i]
  if sum(e[0] == d[0] for e in objects) == 1:
    return "the " + SHAPES[d[0]]
  if sum(e[:2] == d[:2] for e in objects) == 1:
    return f"the {COLOURS[d[1]]} {SHAPES[d[0]]}"
  return "the " + _noun_phrase(d).split(" ", 1)[1]


def _relation_phrase(py, f: Facts, i, j) -> str:
  rs = sorted(r if (a, b) == (i, j) else _INVERSE[r] for a, b, r in f.relations if {a, b} == {i, j})
  x, y = [RELATIONS[r] for r in rs if r < 2], [RELATIONS[r] for r in rs if r >= 2]
  if x and y:
    return f"{y[0]} and to the {x[0]} of"
  return y[0] if y else py.choice(("{} of", "to the {} of")).format(x[0])


def _render(py, f: Facts) -> str | None:
  """Caption text for `f`; None when its template would need ambiguous references."""
  nps = [_noun_phrase(d) for d in f.objects]
  pairs = sorted({(i, j) for i, j, _ in f.relations})
  if len(nps) == 1:
    return py.choice(_PREFIXES) + nps[0] + "."
  if len(nps) == 2 and pairs == [(0, 1)] and py.random() < 0.75:  # needs no references
    prefix = py.choice(_PREFIXES)
    verb = "is " if not prefix and py.random() < 0.3 else ""
    return f"{prefix}{nps[0]} {verb}{_relation_phrase(py, f, 0, 1)} {nps[1]}."
  if len(set(f.objects)) < len(f.objects):
    return None
  if len(nps) == 3 and pairs in ([(0, 1), (0, 2)], [(0, 1), (1, 2)]) and py.random() < 0.6:
    x = pairs[1][0]
    return (f"{nps[0]} {_relation_phrase(py, f, 0, 1)} {nps[1]}, and {nps[2]} "
            f"{_relation_phrase(py, f, 2, x)} {_reference(f.objects, x)}.")
  clauses = [f"{_reference(f.objects, i)} is {_relation_phrase(py, f, i, j)} "
             f"{_reference(f.objects, j)}" for i, j in pairs]
  return (", ".join(nps[:-1]) + " and " + nps[-1] + "; "
          + (" and " if len(clauses) == 2 else ", ").join(clauses) + ".")


def parse_caption(text: str) -> Facts:
  """Facts of a caption: noun phrases are mentions ("the ..." refers back to one), and the
  relation words between two consecutive mentions relate them."""
  words, objects, rels, prev, between, i = _WORD_RE.findall(text.lower()), [], [], None, [], 0
  while i < len(words):
    j, d = i + 1, [-1, -1, -1, -1]
    if words[i] in ("a", "an", "the"):  # attribute words up to a shape make a mention
      while j < len(words) and words[j] in _ATTR_WORD and d[0] < 0:
        col, v = _ATTR_WORD[words[j]]
        d[col], j = v, j + 1
    if d[0] < 0:  # not a mention
      between += [RELATIONS.index(words[i])] if words[i] in RELATIONS else []
      i += 1
      continue
    if words[i] == "the":  # the unique compatible mention, else the identical one
      compat = [k for k, e in enumerate(objects) if all(x in (-1, y) for x, y in zip(d, e))]
      exact = [k for k in compat if objects[k] == tuple(d)]
      if len(compat) != 1 and len(exact) != 1:
        raise ValueError(f"ambiguous reference in {text!r}")
      cur = compat[0] if len(compat) == 1 else exact[0]
    else:
      objects.append(tuple(d))
      cur = len(objects) - 1
    rels += [(prev, cur, r) for r in between]
    prev, between, i = cur, [], j
  return _facts(objects, rels)


# ---------------------------------------------------------------- caption sampling
def _sample_facts(py, attrs, centres) -> Facts:
  k = min(len(attrs), py.choices((1, 2, 3), (0.25, 0.45, 0.3))[0])
  objs = py.sample(range(len(attrs)), k)
  descs = [(a[0], a[1], a[2] if py.random() < 0.4 else -1, a[3] if py.random() < 0.4 else -1)
           for a in (attrs[o] for o in objs)]
  rels = []
  for i, j in [(0, 1), (2, py.randrange(2))][:k - 1]:  # a tree: every object is related
    axes = _axes(centres[objs[i]], centres[objs[j]])
    if len(axes) == 2 and py.random() >= 0.3:
      axes = [py.choice(axes)]
    rels += [(i, j, r) for r in axes]
  return _facts(descs, rels)


def _fallback_facts(attrs, centres, siblings) -> Facts:
  """Fewest fully described objects with all their relations that discriminate (all objects
  always do: members differ as (position, attributes) sets), then greedily shortened."""
  def discriminates(objects, rels):
    f = _facts(objects, rels)
    return len(set(objects)) == len(objects) and not any(_holds(f, *s) for s in siblings)

  for k in range(1, len(attrs) + 1):
    for objs in itertools.combinations(range(len(attrs)), k):
      objects = [tuple(attrs[o]) for o in objs]
      rels = [(i, j, r) for i, j in itertools.combinations(range(k), 2)
              for r in _axes(centres[objs[i]], centres[objs[j]])]
      if not discriminates(objects, rels):
        continue
      for rel in list(rels):
        if len(rels) > 1 and discriminates(objects, [x for x in rels if x != rel]):
          rels.remove(rel)
      for i, col in itertools.product(range(k), (2, 3)):
        trial = objects[:i] + [objects[i][:col] + (-1,) + objects[i][col + 1:]] + objects[i + 1:]
        objects = trial if discriminates(trial, rels) else objects
      return _facts(objects, rels)
  return _facts(objects, rels)


def _captions(py, attrs, centres, siblings, rivals=None) -> list[str]:
  """CAPTIONS_PER_IMAGE captions true of (attrs, centres) and false of every sibling.

  `rivals(facts)`, when given, narrows the images a sampled caption is checked against (to
  those it could be true of); `siblings` must still hold every image it could return.
  """
  out = []
  while len(out) < CAPTIONS_PER_IMAGE:
    for _ in range(_TRIES):
      f = _sample_facts(py, attrs, centres)
      if (not any(_holds(f, *s) for s in (rivals(f) if rivals else siblings))
              and (text := _render(py, f)) is not None
              and len(_WORD_RE.findall(text)) <= MAX_TOKENS and text not in out):
        break
    else:
      f = _fallback_facts(attrs, centres, siblings)  # renders vary: prefer new, then short
      text = min((_render(py, f) for _ in range(8)),
                 key=lambda t: (t in out, len(_WORD_RE.findall(t))))
    out.append(text)
  return out


# ---------------------------------------------------------------- scenes and detector
def _variant(py, base):
  """One edit of the base; objects are (shape, colour, material, size, position)."""
  objs, n = [list(o) for o in base], len(base)
  op = py.choices(("colour", "material", "position", "change"), (0.35, 0.15, 0.3, 0.2))[0]
  if op == "change" or n < 2:
    o, col = py.randrange(n), py.randrange(4)
    objs[o][col] = py.choice([v for v in range(len(ATTRIBUTES[col])) if v != objs[o][col]])
  else:
    i, j = py.sample(range(n), 2)
    col = {"colour": 1, "material": 2, "position": 4}[op]
    objs[i][col], objs[j][col] = objs[j][col], objs[i][col]
  return tuple(map(tuple, objs))


def _family(py, attrs, size):
  base = [tuple(a) for a in attrs]
  while len(set(base)) < len(base):  # twins could only be told apart by position
    base[py.randrange(len(base))] = tuple(py.randrange(len(v)) for v in ATTRIBUTES)
  members = [tuple(a + (o,) for o, a in enumerate(base))]
  seen = {tuple(sorted(members[0]))}
  for _ in range(100 * size):
    if len(members) == size:
      break
    v = _variant(py, members[0])  # an equal (attributes, position) set: no caption differs
    if tuple(sorted(v)) not in seen and len({o[:4] for o in v}) == len(v):
      members.append(v)
      seen.add(tuple(sorted(v)))
  if len(members) < size:
    raise ValueError(f"family_size={size} exceeds the distinct one-edit variants of a scene")
  return members


@functools.lru_cache(maxsize=2)
def _detector(feature_seed: int):
  """Per-value vectors [23, 2048]; their sums per attribute combination [768, 2048] (one
  gather per batch beats a one-hot matmul); windows of the noise tape [_TAPE_LEN, 2048]."""
  rng = np.random.default_rng(feature_seed)
  table = rng.standard_normal((_ATTR_OFFSET[-1] + len(SIZES), FEATURE_DIM), dtype=np.float32) * 0.5
  combos = np.stack(np.meshgrid(*[np.arange(len(v)) for v in ATTRIBUTES], indexing="ij"), -1)
  combined = table[combos.reshape(-1, 4) + _ATTR_OFFSET].sum(1)  # row = _combo_index(attrs)
  tape = rng.standard_normal(_TAPE_LEN + FEATURE_DIM - 1, dtype=np.float32)
  return table, combined, sliding_window_view(tape, FEATURE_DIM)


def _combo_index(attrs):  # [..., 4] -> [...], row-major over (shape, colour, material, size)
  return np.ravel_multi_index(np.moveaxis(np.maximum(attrs, 0), -1, 0),
                              [len(v) for v in ATTRIBUTES])


def _tape_offsets(image_ids, seed, width):  # splitmix64 of (seed, id, slot) -> [B, width]
  slots = np.arange(width, dtype=np.uint64)
  z = image_ids.astype(np.uint64)[:, None] * np.uint64(width) + slots
  z ^= np.uint64((seed * 0x9E3779B97F4A7C15 + 1) % 2**64)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return ((z ^ (z >> np.uint64(31))) % np.uint64(_TAPE_LEN)).astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class Scenes:
  """One generated split; region features are computed on demand by `region_features`."""
  split: str
  image_ids: np.ndarray  # [N] int64, unique across splits
  attributes: np.ndarray  # [N, R, 4] int32 (shape, colour, material, size), -1 padded
  boxes: np.ndarray  # [N, R, 6] float32 normalised, 0 padded; R = max_objects
  num_regions: np.ndarray  # [N] int32
  captions: list[str]  # [N * 5]; row i owns 5*i .. 5*i+4
  caption_image: np.ndarray  # [T] int32 image row of each caption
  feature_seed: int
  noise_std: float
  seed: int = 0
  family_size: int = 4  # rows f*family_size .. (f+1)*family_size-1 are family f

  @property
  def num_images(self) -> int:
    return len(self.image_ids)

  @property
  def num_texts(self) -> int:
    return len(self.captions)

  @property
  def max_regions(self) -> int:
    return self.attributes.shape[1]

  def siblings(self) -> np.ndarray:
    """[N, family_size - 1] rows of each image's family siblings: every caption is false of them."""
    rows = np.arange(self.num_images)
    family = rows - rows % self.family_size
    others = (rows[:, None] + np.arange(1, self.family_size)) % self.family_size
    return (family[:, None] + others).astype(np.int64)

  def region_features(self, rows) -> tuple[np.ndarray, np.ndarray]:
    """([B, R, 2054] float32 features incl. box, [B, R] bool mask); R = `max_regions`."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    attrs = self.attributes[rows]  # [B, R, 4]
    _, combined, windows = _detector(self.feature_seed)
    out = np.empty((rows.size, self.max_regions, REGION_DIM), np.float32)
    out[..., :FEATURE_DIM] = combined[_combo_index(attrs)]
    if self.noise_std > 0:
      noise = windows[_tape_offsets(self.image_ids[rows], self.seed, self.max_regions)]  # [B, R, 2048]
      out[..., :FEATURE_DIM] += np.multiply(noise, np.float32(self.noise_std), out=noise)
    out[..., FEATURE_DIM:] = self.boxes[rows]
    mask = attrs[..., 0] >= 0  # [B, R]
    out[~mask] = 0.0
    return out, mask


def generate(split: str, *, seed: int = 0, num_images: int | None = None, family_size: int = 4,
             noise_std: float = DEFAULT_NOISE_STD, min_objects: int = 2,
             max_objects: int = MAX_REGIONS, unique_captions: bool | None = None) -> Scenes:
  """Generate a split; num_images (default SPLIT_SIZES[split]) is rounded up to whole families.

  `unique_captions` (default: on for dev and test, off for train) makes every caption false of
  every other image of the split, not only of its family, so each caption has exactly one
  correct image, as the standard retrieval protocol scores it.
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_SIZES)}")
  num_images = SPLIT_SIZES[split] if num_images is None else num_images
  if not 1 <= min_objects <= max_objects <= GRID_CELLS or family_size < 1 or num_images < 1:
    raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID_CELLS}, family_size >= 1 "
                     f"and num_images >= 1; found min_objects={min_objects}, "
                     f"max_objects={max_objects}, family_size={family_size}, "
                     f"num_images={num_images}")
  num_families = -(-num_images // family_size)
  width = max_objects  # regions per image, padded
  n, split_index = num_families * family_size, list(SPLIT_SIZES).index(split)
  rng = np.random.default_rng(np.random.SeedSequence([seed, split_index]))
  py = random.Random(int(rng.integers(2**63)))  # per-call draws in the Python loops are cheaper
  counts = rng.integers(min_objects, max_objects + 1, num_families)
  base_attrs = np.stack(
      [rng.integers(0, len(v), (num_families, width)) for v in ATTRIBUTES], -1)
  cells = np.argsort(rng.random((num_families, 9)), axis=1)[:, :width]  # distinct cells
  jitter = rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER, (num_families, width, 2))
  extent = rng.uniform(-_EXTENT_JITTER, _EXTENT_JITTER, (num_families, width, 2))

  attributes = np.full((n, width, 4), -1, np.int32)  # object order for now
  position = np.zeros((n, width), np.int64)  # index into the family's cells and jitters
  for f in range(num_families):
    for m, objs in enumerate(_family(py, base_attrs[f, :counts[f]].tolist(), family_size)):
      attributes[f * family_size + m, :len(objs)] = [o[:4] for o in objs]
      position[f * family_size + m, :len(objs)] = [o[4] for o in objs]
  num_regions = np.repeat(counts, family_size).astype(np.int32)
  valid = np.arange(width) < num_regions[:, None]  # [N, R]
  order = np.argsort(np.where(valid, rng.random((n, width)), 2.0), axis=1)  # padding last
  attributes = np.take_along_axis(attributes, order[..., None], 1)  # detector order
  family = (np.arange(n) // family_size)[:, None]
  position = np.take_along_axis(position, order, 1)
  cell = cells[family, position]  # [N, R]
  centre = np.stack([cell % 3, cell // 3], -1) + 0.5 + jitter[family, position]  # cell units
  size = _SIZE_FRACTION[np.maximum(attributes[..., 3], 0)][..., None]
  half = size * (1 + extent[family, order]) / 2  # extent jitter travels with the object
  lo = np.round((centre - half) * [IMAGE_W / 3, IMAGE_H / 3])  # [N, R, 2] pixels
  hi = np.round((centre + half) * [IMAGE_W / 3, IMAGE_H / 3])
  wh = np.array([IMAGE_W, IMAGE_H])
  boxes = np.concatenate([lo / wh, hi / wh, (hi - lo) / wh], -1).astype(np.float32)
  boxes *= valid[..., None]  # [N, R, 6]

  # captions see exactly the float32 boxes that facts_hold will see
  attrs = [a[:k] for a, k in zip(attributes.tolist(), num_regions.tolist())]
  centres = np.stack([boxes[..., 0] + boxes[..., 2], boxes[..., 1] + boxes[..., 3]], -1) / 2
  centres = [c[:k] for c, k in zip(centres.tolist(), num_regions.tolist())]
  if unique_captions is None:
    unique_captions = split != "train"
  with_kind = collections.defaultdict(set)  # (shape, colour) -> rows holding such an object
  for row, objs in enumerate(attrs if unique_captions else ()):
    for o in objs:
      with_kind[tuple(o[:2])].add(row)
  captions = []
  for row in range(n):
    first = row - row % family_size
    others, rivals = range(first, first + family_size), None
    if unique_captions:  # a caption can only be true of images holding all its (shape, colour)s
      others = sorted(set().union(*(with_kind[tuple(o[:2])] for o in attrs[row])))
      rivals = lambda f, row=row: [  # pylint: disable=cell-var-from-loop
          (attrs[s], centres[s]) for s in set.intersection(*(
              with_kind[d[:2]] for d in f.objects)) if s != row]
    captions += _captions(py, attrs[row], centres[row],
                          [(attrs[s], centres[s]) for s in others if s != row], rivals)
  return Scenes(split=split, image_ids=split_index * 10_000_000 + np.arange(n, dtype=np.int64),
                attributes=attributes, boxes=boxes, num_regions=num_regions, captions=captions,
                caption_image=np.repeat(np.arange(n, dtype=np.int32), CAPTIONS_PER_IMAGE),
                feature_seed=DETECTOR_SEED, noise_std=float(noise_std), seed=seed,
                family_size=family_size)


def vocabulary() -> list[str]:
  """Every word the caption grammar can produce, then the punctuation tokens."""
  return [*itertools.chain(*ATTRIBUTES), *RELATIONS, *_FILLER, ",", ";", "."]


def build_tokenizer() -> tokenizers.Tokenizer:
  """WordLevel over SPECIAL_TOKENS (ids 0-4) + vocabulary(); "[CLS] $A [SEP]"; no padding."""
  vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.add_special_tokens(list(SPECIAL_TOKENS))  # keeps their ids; decode() skips them
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tok


# ---------------------------------------------------------------- pixels
RENDER_SIZE = 64  # default side of a rendered image, pixels
PIXEL_NOISE = 3.0  # std of the per-pixel noise, grey levels
BACKGROUND = (128, 128, 128)
RGB = np.array([(220, 35, 35), (35, 75, 230), (35, 165, 55), (240, 215, 35),  # in COLOURS order
                (145, 45, 190), (250, 135, 20), (245, 245, 245), (15, 15, 15)], np.float32)
_WOOD = np.array((120, 75, 35), np.float32)  # stripe colour of wooden objects
_SUPERSAMPLE = 4


def _silhouette(shape: str, w: int, h: int) -> np.ndarray:
  """Mask [h, w] bool of `shape` filling a w x h box (supersampled pixels)."""
  im = Image.new("L", (w, h), 0)
  d = ImageDraw.Draw(im)
  x2, y2, cx, e = w - 1, h - 1, (w - 1) / 2, 0.12 * h  # e: half height of a round end
  if shape == "cube":
    d.rectangle((0, 0, x2, y2), fill=1)
  elif shape == "sphere":
    d.ellipse((0, 0, x2, y2), fill=1)
  elif shape == "cylinder":
    lo, hi = 0.2 * w, 0.8 * w - 1
    d.rectangle((lo, e, hi, y2 - e), fill=1)
    d.ellipse((lo, 0, hi, 2 * e), fill=1)
    d.ellipse((lo, y2 - 2 * e, hi, y2), fill=1)
  elif shape == "cone":
    lo, hi = 0.15 * w, 0.85 * w - 1
    d.polygon([(cx, 0), (lo, y2 - e), (hi, y2 - e)], fill=1)
    d.ellipse((lo, y2 - 2 * e, hi, y2), fill=1)
  elif shape == "pyramid":
    d.polygon([(cx, 0), (0, y2), (x2, y2)], fill=1)
  elif shape in ("torus", "ring"):
    d.ellipse((0, 0, x2, y2), fill=1)
    f = 0.3 if shape == "torus" else 0.12  # band width: a thick ring vs a thin one
    d.ellipse((f * w, f * h, x2 - f * w, y2 - f * h), fill=0)
  elif shape == "star":
    angle = np.pi * (np.arange(10) / 5 - 0.5)
    radius = np.where(np.arange(10) % 2, 0.2, 0.5)
    d.polygon(list(zip(cx + radius * w * np.cos(angle), (y2 / 2) + radius * h * np.sin(angle))),
              fill=1)
  else:
    raise ValueError(f"no silhouette for shape {shape!r}")
  return np.asarray(im, bool)


def _surface(material: str, colour: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Colours [h, w, 3] of an object's pixels and opacity [h, w, 1] (glass lets light through)."""
  h, w = mask.shape
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  alpha = np.ones((h, w, 1), np.float32)
  if material == "rubber":  # matte: the flat colour
    out = np.broadcast_to(colour, (h, w, 3)).copy()
  elif material == "metal":  # lit from the top left, with a specular highlight there
    shade = 1.25 - 0.6 * (x / w + y / h) / 2
    out = colour * shade[..., None]
    spot = (x / w - 0.32) ** 2 + (y / h - 0.3) ** 2 < 0.012
    out[spot] = 255.0
  elif material == "glass":  # half transparent, with a thin rim of light tinted by its colour
    out = np.broadcast_to(colour, (h, w, 3)).copy()
    alpha *= 0.55
    rim = mask & ~_eroded(mask, max(1, min(h, w) // 16))
    out[rim], alpha[rim] = 0.4 * colour + 0.6 * 255.0, 0.9
  elif material == "wooden":  # horizontal grain
    out = np.broadcast_to(colour, (h, w, 3)).copy()
    grain = (y // max(1.0, h / 7)) % 2 == 1
    out[grain] = 0.45 * colour + 0.55 * _WOOD
  else:
    raise ValueError(f"no surface for material {material!r}")
  return np.clip(out, 0, 255), alpha


def _eroded(mask: np.ndarray, r: int) -> np.ndarray:
  """`mask` shrunk by r pixels (a pixel stays if its (2r+1)^2 neighbourhood is inside)."""
  padded = np.pad(mask, r).astype(np.uint8) * 255  # outside the box counts as outside
  im = Image.fromarray(padded).filter(ImageFilter.MinFilter(2 * r + 1))
  return np.asarray(im)[r:-r, r:-r] > 0


@functools.lru_cache(maxsize=8192)
def _sprite(shape: int, colour: int, material: int, w: int, h: int):
  """An object drawn into a w x h pixel box: (premultiplied colour [h, w, 3], coverage
  [h, w, 1]), drawn _SUPERSAMPLE times finer and averaged down. Cached: a scene's objects
  repeat across images, and the background under a box is uniform, so blending the averaged
  sprite equals averaging the blended supersampled box."""
  k = _SUPERSAMPLE
  mask = _silhouette(SHAPES[shape], k * w, k * h)
  colours, alpha = _surface(MATERIALS[material], RGB[colour], mask)
  alpha = alpha * mask[..., None]
  down = lambda x: x.reshape(h, k, w, k, x.shape[-1]).mean((1, 3))  # noqa: E731
  return down(alpha * colours), down(alpha)


@functools.lru_cache(maxsize=2)
def _pixel_noise_tape(length: int) -> np.ndarray:
  """A fixed tape of N(0, PIXEL_NOISE) values; an image's noise is a window of it."""
  rng = np.random.default_rng(DETECTOR_SEED + 1)
  return rng.standard_normal(_TAPE_LEN + length, dtype=np.float32) * np.float32(PIXEL_NOISE)


def render_one(attributes: np.ndarray, boxes: np.ndarray, size: int = RENDER_SIZE,
               noise: np.ndarray | None = None) -> np.ndarray:
  """One image uint8 [size, size, 3]: attributes [R, 4] (-1 padded), boxes [R, 6] normalised.

  `noise` [size, size, 3] float32 is added before rounding (`render` draws the image's own).
  """
  canvas = np.empty((size, size, 3), np.float32)
  canvas[:] = BACKGROUND
  for (shape, colour, material, _), box in zip(attributes.tolist(), boxes.tolist()):
    if shape < 0:
      continue
    # The box on whole pixels of the canvas (the 640 x 480 frame stretched to a square).
    x1, y1 = round(box[0] * size), round(box[1] * size)
    x2, y2 = max(round(box[2] * size), x1 + 1), max(round(box[3] * size), y1 + 1)
    paint, alpha = _sprite(shape, colour, material, x2 - x1, y2 - y1)
    canvas[y1:y2, x1:x2] = paint + (1 - alpha) * canvas[y1:y2, x1:x2]
  if noise is not None:
    canvas += noise
  return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render(scenes: Scenes, rows, size: int = RENDER_SIZE) -> np.ndarray:
  """Images of `rows` as uint8 [B, size, size, 3], each deterministic per (seed, image id)."""
  rows = np.asarray(rows, dtype=np.int64).reshape(-1)
  n = size * size * 3
  tape = _pixel_noise_tape(n)
  starts = _tape_offsets(scenes.image_ids[rows], scenes.seed + 1, 1)[:, 0]  # [B]
  out = np.empty((rows.size, size, size, 3), np.uint8)
  for i, (r, start) in enumerate(zip(rows.tolist(), starts.tolist())):
    out[i] = render_one(scenes.attributes[r], scenes.boxes[r], size,
                        tape[start:start + n].reshape(size, size, 3))
  return out


def image_name(image_id: int) -> str:
  """File name `write_images` gives image `image_id`."""
  return f"scene_{int(image_id):08d}.png"


def write_images(scenes: Scenes, folder: str, rows=None, size: int = RENDER_SIZE,
                 overwrite: bool = False) -> list[str]:
  """Writes `rows` (default: all) as PNG files `image_name(id)` into `folder`; their paths.

  The folder is created if needed. Files of those names already there are an error unless
  `overwrite`; each file is written to a temporary name first, then renamed.
  """
  rows = np.arange(scenes.num_images) if rows is None else np.asarray(rows, np.int64).reshape(-1)
  paths = [os.path.join(folder, image_name(scenes.image_ids[r])) for r in rows]
  taken = [p for p in paths if os.path.exists(p)]
  if taken and not overwrite:
    raise errors.expected(folder, "no files of the names to write (pass overwrite=True to replace "
                          "them)", errors.entries(os.path.basename(p) for p in taken))
  os.makedirs(folder, exist_ok=True)
  for start in range(0, len(rows), 256):  # bounded memory for whole splits
    chunk = rows[start:start + 256]
    for path, pixels in zip(paths[start:start + 256], render(scenes, chunk, size)):
      tmp = f"{path}.tmp{os.getpid()}"
      Image.fromarray(pixels, "RGB").save(tmp, format="PNG")
      os.replace(tmp, path)
  return paths
