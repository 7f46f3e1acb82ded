"""Multi30k: Flickr30k images with English, German, French and Czech captions.

Source directory (the Multi30k repo's task 1 and task 2 files, plain or .gz, side by side):
  image_splits/S.txt    image file names of split S, one per line (`1000092795.jpg`)
  S.K.L                 task 2: caption K (1..5) of each image, line-aligned with the list
  S.L                   task 1: one caption per image (the fr and cs translations)
for S in {train, val, test_2016} and L in {en, de, fr, cs}; task 1's `test_2016_flickr`
names are accepted for test_2016. A language with task-2 files (en, de: 5 captions) takes
those; the others take their task-1 file (fr, cs: 1 caption). Features come from the
Flickr30k bottom-up-attention TSV (`--features=GLOB`, see flickr30k_butd).
"""

import os

from rerank.data.sources import common
from rerank.data.sources import flickr30k_butd

SPLITS = ("train", "val", "test_2016")
DEV_SPLIT = "val"
LANGUAGES = ("en", "de", "fr", "cs")
_ALIASES = {"test_2016": ("test_2016", "test_2016_flickr")}


def _find(source_dir: str, split: str, suffix: str) -> str | None:
  for name in _ALIASES.get(split, (split,)):
    for ext in ("", ".gz"):
      path = os.path.join(source_dir, f"{name}{suffix}{ext}")
      if os.path.exists(path):
        return path
  return None


def _image_list(source_dir: str, split: str) -> str:
  path = _find(os.path.join(source_dir, "image_splits"), split, ".txt")
  if path is None:
    raise common.BadInput("missing_file", os.path.join(source_dir, "image_splits", f"{split}.txt"),
                          f"Multi30k image list of split {split!r} not found")
  return path


def caption_files(source_dir: str, split: str) -> dict[str, list[str]]:
  """language -> its caption files for `split` (5 task-2 files, else 1 task-1 file)."""
  out = {}
  for lang in LANGUAGES:
    five = [_find(source_dir, split, f".{k}.{lang}") for k in range(1, 6)]
    if all(five):
      out[lang] = five
    elif (one := _find(source_dir, split, f".{lang}")) is not None:
      out[lang] = [one]
  if not out:
    raise common.BadInput("missing_file", os.path.join(source_dir, f"{split}.*"),
                          f"no caption files for split {split!r} (expected {split}.1.en ... or "
                          f"{split}.fr ...)")
  return out


def check_files(source_dir: str, splits) -> None:
  for split in splits:
    _image_list(source_dir, split)
    caption_files(source_dir, split)


def read(source_dir: str, split: str, problems: common.Problems,
         index: flickr30k_butd.FeatureIndex):
  """Yields the split's `Image`s in image-list order, captions grouped by language."""
  list_path = _image_list(source_dir, split)
  keys = common.read_id_list(list_path, problems)
  columns = []  # (language, path, lines)
  for lang, paths in caption_files(source_dir, split).items():
    for path in paths:
      lines = common.read_lines(path)
      if len(lines) != len(keys):
        raise common.BadInput("malformed_row", path, f"expected one caption per image of "
                              f"{list_path} ({len(keys)} lines); found {len(lines)}")
      columns.append((lang, path, lines))
  for i, k in enumerate(keys):
    where = f"{list_path}:{i + 1}: image id {k}"
    caps, langs = [], []
    for lang, path, lines in columns:
      for c in common.clean_captions([lines[i]], f"{path}:{i + 1}", problems):
        caps.append(c)
        langs.append(lang)
    if k not in index:
      problems.bad("caption_without_image", where, "no feature row in " +
                   ", ".join(os.path.basename(p) for p in index.paths))
      continue
    if not caps:
      problems.bad("image_without_captions", where, "no non-empty caption in any language")
      continue
    row = index.read(k, problems)
    if row is None:
      continue
    regions, boxes, size = row
    yield common.Image(image_id=k, regions=regions, boxes=boxes, image_size=size,
                       captions=caps, languages=langs)
