r"""Converts an authors' dataset release into a TFDS dataset (array_record, no TensorFlow).

  python -m rerank.data.prepare --dataset=NAME --source_dir=DIR --data_dir=DIR [--dtype=float16]
      [--features=GLOB] [--splits=a,b] [--skip_bad] [--overwrite]

NAME: coco_oscar, flickr30k_butd, multi30k, cc_dev or synthetic_scenes (source files of
each: README "Datasets", or the docstring of rerank/data/sources/NAME.py). Writes
DATA_DIR/NAME/1.0.0 and ends by printing one JSON line:
  {"dataset": NAME, "splits": {"<split>": {"images": n, "captions": m}, ...}, "skipped": {...},
   "dtype": ..., "path": ...}
Bad input (malformed rows, wrong feature widths, NaN/inf, 0 or over 100 regions, image sizes
that are not positive int32 values, captions without images, images without captions,
duplicate ids (also one image in two splits, and ids such as `12` and `012` that training reads
as one number), ids that are not plain names (`../x`), empty captions (also of only zero-width
characters)) stops with the file, line or id and the reason; `--skip_bad` drops such items
instead and reports their counts under "skipped". A file that cannot be read at all (missing,
not UTF-8 text, not a gzip or torch file, not a dict of image ids) stops the prepare either way.
A failed prepare leaves no dataset directory behind, and the next prepare of NAME removes what a
killed one left (see `tfds_builders.remove_stale`).

Datasets from image files (for the pixel families, ViLT and BLIP):

  python -m rerank.data.prepare --source=karpathy --karpathy_json=FILE --source_dir=IMAGES
      --dataset=NAME --data_dir=DIR [--splits=train,val,test] [--skip_bad] [--overwrite]

FILE is a Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json), IMAGES the directory
its filepath/filename entries are relative to, NAME any lower-case name (not one of the region
releases'). Splits train (with restval), val, test; the encoded images and captions are stored
(see `sources/karpathy.py`). The summary adds "converted" (images stored after conversion, by
what was done) and "restval_in_train". Missing, unreadable, truncated or huge images stop the
prepare with the file and image id, or with --skip_bad are counted under "skipped".
"""

import collections
import contextlib
import json
import os
import re
import sys
import time

from absl import flags

from rerank import cli
from rerank.data import tfds_builders
from rerank.data.sources import SOURCES
from rerank.data.sources import common
from rerank.data.sources import flickr30k_butd
from rerank.data.sources import karpathy
from rerank.data.sources import synthetic

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_enum("source", "release", ["release", "karpathy"], "release: an authors' region "
                    "release named by --dataset; karpathy: image files listed in a "
                    "Karpathy-split JSON (--karpathy_json), written as dataset --dataset.")
  flags.DEFINE_string("dataset", None, f"Which release to convert: one of {', '.join(SOURCES)}; "
                      "with --source=karpathy the name to write the dataset under.")
  flags.DEFINE_string("source_dir", None, "Directory with the release's files (--source="
                      "karpathy: the image directory the JSON's paths are relative to).")
  flags.DEFINE_string("karpathy_json", None, "--source=karpathy: dataset_coco.json, "
                      "dataset_flickr30k.json or another file in that format.")
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write NAME/1.0.0 into.")
  flags.DEFINE_enum("dtype", "float16", list(tfds_builders.DTYPES),
                    "Storage type of region features (boxes are always float32).")
  flags.DEFINE_string("features", None, "flickr30k_butd/multi30k: glob of the "
                      "bottom-up-attention TSV files (default SOURCE_DIR/*.tsv*).")
  flags.DEFINE_list("splits", None, "Only these splits (default: all of the dataset).")
  flags.DEFINE_bool("skip_bad", False, "Skip bad items and count them instead of "
                    "stopping at the first.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing prepared dataset.")
  flags.DEFINE_integer("num_images", 0, "synthetic_scenes: images per split "
                       "(0 = full size).")
  flags.DEFINE_integer("seed", 0, "synthetic_scenes: generator seed.")


def split_readers(name: str, source_dir: str, splits, problems: common.Problems,
                  features: str | None = None, num_images: int = 0, seed: int = 0) -> dict:
  """{split: zero-argument function yielding that split's `Image`s}; checks files first."""
  source = SOURCES[name]
  source.check_files(source_dir, splits)
  if name == "synthetic_scenes":
    return {s: (lambda s=s: synthetic.read(s, seed=seed, num_images=num_images or None))
            for s in splits}
  if name in ("flickr30k_butd", "multi30k"):
    index = flickr30k_butd.FeatureIndex(
        flickr30k_butd.feature_paths(source_dir, features), problems)
    return {s: (lambda s=s: source.read(source_dir, s, problems, index)) for s in splits}
  return {s: (lambda s=s: source.read(source_dir, s, problems)) for s in splits}


def prepare(name: str, source_dir: str, data_dir: str, dtype: str = "float16", splits=None,
            skip_bad: bool = False, overwrite: bool = False, features: str | None = None,
            num_images: int = 0, seed: int = 0) -> dict:
  """Builds the dataset; returns the summary that the CLI prints. Raises on bad input."""
  source = SOURCES[name]
  splits = list(splits or source.SPLITS)
  unknown = [s for s in splits if s not in source.SPLITS]
  if unknown:
    raise ValueError(f"--splits: {name} has splits {list(source.SPLITS)}; found {unknown}")
  problems = common.Problems(skip=skip_bad)
  readers = split_readers(name, source_dir, splits, problems, features, num_images, seed)
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is the summary
    counts = tfds_builders.build(name, readers, data_dir, dtype, problems, overwrite,
                                 getattr(source, "NESTED", None))
  return {"dataset": name, "splits": counts, "skipped": dict(sorted(problems.counts.items())),
          "dtype": dtype, "path": tfds_builders.dataset_dir(data_dir, name)}


def prepare_karpathy(name: str, json_path: str, image_dir: str, data_dir: str, splits=None,
                     skip_bad: bool = False, overwrite: bool = False, workers: int = 4) -> dict:
  """Builds a pixel dataset from a Karpathy-split JSON and its image directory; returns the
  summary that the CLI prints. Raises on bad input (nothing is left behind)."""
  explicit = bool(splits)
  splits = list(splits or karpathy.SPLITS)
  unknown = [s for s in splits if s not in karpathy.SPLITS]
  if unknown:
    raise ValueError(f"--splits: Karpathy-split datasets have splits {list(karpathy.SPLITS)} "
                     f"(restval is part of train); found {unknown}")
  karpathy.check_files(json_path, image_dir)
  problems = common.Problems(skip=skip_bad)
  entries = karpathy.read_entries(json_path, problems)
  listed = {e.split for e in entries}
  if not explicit:
    splits = [s for s in splits if s in listed]  # e.g. a file of test images only
  empty = [s for s in splits if s not in listed]
  if empty or not splits:
    raise ValueError(f"{json_path}: expected images in split(s) {empty or list(karpathy.SPLITS)} "
                     f"(restval counts as train); found none")
  converted = collections.Counter()
  readers = {s: (lambda s=s: karpathy.read(entries, image_dir, s, problems, converted, workers))
             for s in splits}
  try:
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is the summary
      counts = tfds_builders.build(name, readers, data_dir, "float32", problems, overwrite,
                                   pixels=True)
  except AssertionError as e:  # TFDS refuses a split whose every image was skipped
    split = re.search(r'split "(\w+)"', str(e))
    if "No examples" not in str(e) or not split:
      raise
    raise ValueError(f"{json_path}: split {split.group(1)!r}: every image was skipped "
                     f"({dict(problems.counts)})") from None
  restval = sum(e.listed_as == "restval" for e in entries)
  return {"dataset": name, "source": "karpathy", "splits": counts,
          "skipped": dict(sorted(problems.counts.items())),
          "converted": dict(sorted(converted.items())),
          "restval_in_train": restval if "train" in splits else 0,
          "path": tfds_builders.dataset_dir(data_dir, name)}


def _check_name(name) -> None:
  """--dataset of --source=karpathy: a new lower-case name, not a region release's."""
  if not name:
    cli.fail("--dataset is required: the name to write DATA_DIR/NAME/1.0.0 under (e.g. "
             "coco_images)")
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in SOURCES:
    cli.fail(f"--dataset: expected a lower-case name of letters, digits and '_' that is not "
             f"one of the region releases ({', '.join(SOURCES)}); found {name!r}")


def _main_karpathy():
  _check_name(FLAGS.dataset)
  if not FLAGS.karpathy_json:
    cli.fail("--karpathy_json is required with --source=karpathy (dataset_coco.json, "
             "dataset_flickr30k.json, ...)")
  if not FLAGS.source_dir or not os.path.isdir(FLAGS.source_dir):
    cli.fail(f"--source_dir: expected the image directory of {FLAGS.karpathy_json}; found "
             f"{FLAGS.source_dir!r}")
  return lambda: prepare_karpathy(FLAGS.dataset, FLAGS.karpathy_json, FLAGS.source_dir,
                                  FLAGS.data_dir, FLAGS.splits, FLAGS.skip_bad, FLAGS.overwrite,
                                  workers=min(8, os.cpu_count() or 1))


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.data_dir:
    cli.fail("--data_dir is required (where NAME/1.0.0 is written)")
  if FLAGS.source == "karpathy":
    _run(_main_karpathy())
    return
  name = FLAGS.dataset
  if name is None:
    cli.fail(f"--dataset is required: one of {', '.join(SOURCES)}")
  if name not in SOURCES:
    cli.fail(f"--dataset: expected one of {', '.join(SOURCES)} (or --source=karpathy for "
             f"image files); found {name!r}")
  source_dir = FLAGS.source_dir
  if name != "synthetic_scenes" and (not source_dir or not os.path.isdir(source_dir)):
    cli.fail(f"--source_dir: expected a directory with the {name} release files; "
             f"found {source_dir!r}")
  for flag in ("num_images", "seed"):
    if FLAGS[flag].value < 0:
      cli.fail(f"--{flag}: expected an integer >= 0; found {FLAGS[flag].value}")
  _run(lambda: prepare(name, source_dir, FLAGS.data_dir, FLAGS.dtype, FLAGS.splits,
                      FLAGS.skip_bad, FLAGS.overwrite, FLAGS.features, FLAGS.num_images,
                      FLAGS.seed))


def _run(build):
  """Runs `build()` and prints its summary as one JSON line, or fails with one error line."""
  tfds_builders.quiet()
  t0 = time.perf_counter()
  try:
    summary = build()
  except common.BadInput as e:
    if cli.debugging():
      raise
    hint = "" if e.kind in common.FILE_KINDS else " (--skip_bad skips such items and counts them)"
    cli.fail(f"{e}{hint}; nothing was written")
  except (FileExistsError, RuntimeError, ValueError, OSError) as e:
    if cli.debugging():
      raise
    cli.fail(f"{e}; nothing was written")
  summary["seconds"] = round(time.perf_counter() - t0, 3)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags)
