r"""Prints prepare throughput (images/s) and training-input throughput (batches/s).

  python -m rerank.data.benchmark [--images=1000] [--steps=30] [--batch=128]

Writes a synthetic Flickr30k-format release (bottom-up-attention TSV with 10-100 regions per
image, flickr30k_entities Sentences with 5 captions, split lists) to a temporary directory,
times `prepare` on it for float16 and float32 storage, then times the trainer's input path on
the prepared split at base-size inputs (50 regions, 70 tokens, joint BE + CE batches):
`batches.train_batch(..., lazy=True)` chooses the rows and negatives of a step, and reading its
region features (what `sharding.shard_batch` does per device) completes it. TSV writing is not
timed. All figures of one run come from the same machine and files, so their ratios compare
like with like.
"""

import base64
import os
import shutil
import tempfile
import time

from absl import flags
import ml_collections
import numpy as np

from rerank import cli
from rerank.data import batches
from rerank.data import datasets
from rerank.data import prepare
from rerank.data import tfds_builders

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("images", 1000, "Images in the synthetic release (train split).")
  flags.DEFINE_integer("steps", 30, "Timed training-input steps.")
  flags.DEFINE_integer("batch", 128, "Global batch (captions per step).")


_WORDS = [f"word{i}" for i in range(500)]


def write_release(root: str, num_images: int, seed: int = 0) -> int:
  """A Flickr30k-format release (`num_images` train images, one each in val and test); returns
  the TSV size in bytes."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "Sentences"))
  keys = list(range(1000, 1000 + num_images + 2))
  # prepare refuses an image in two splits: val and test get one image of their own.
  splits = {"train": keys[:num_images], "val": keys[-2:-1], "test": keys[-1:]}
  for split, split_keys in splits.items():
    with open(os.path.join(root, f"{split}.txt"), "w") as f:
      f.write("".join(f"{k}\n" for k in split_keys))
  with open(os.path.join(root, "feats.tsv"), "w") as f:
    for k in keys:
      n = int(rng.integers(10, 101))
      xy = rng.uniform(0, 300, (n, 2))
      boxes = np.concatenate([xy, xy + rng.uniform(1, 200, (n, 2))], 1).astype(np.float32)
      feats = np.abs(rng.normal(size=(n, 2048))).astype(np.float32)
      f.write(f"{k}\t500\t500\t{n}\t{base64.b64encode(boxes.tobytes()).decode()}\t"
              f"{base64.b64encode(feats.tobytes()).decode()}\n")
      with open(os.path.join(root, "Sentences", f"{k}.txt"), "w") as s:
        for _ in range(5):
          words = rng.choice(_WORDS, int(rng.integers(8, 20)))
          s.write(f"[/EN#{k}/people {words[0]} {words[1]}] " + " ".join(words[2:]) + " .\n")
  with open(os.path.join(root, "vocab.txt"), "w") as f:
    f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", *_WORDS]) + "\n")
  return os.path.getsize(os.path.join(root, "feats.tsv"))


def _materialise(tree):
  """Every leaf as a numpy array: `LazyRows` leaves read their region features here."""
  if isinstance(tree, dict):
    return {k: _materialise(v) for k, v in tree.items()}
  return np.asarray(tree)


def time_training_input(data: batches.RetrievalData, parts: tuple[str, ...], batch_size: int,
                        steps: int, seed: int = 0) -> dict:
  """Times `steps` training batches as the trainer builds them (after one warm-up step).

  Returns the seconds spent choosing rows and negatives (`train_batch(lazy=True)`), the seconds
  spent reading the region features of the chosen rows, and the last batch.
  """
  _materialise(batches.train_batch(data, parts, batch_size, seed, 0, lazy=True))  # warm-up
  choose = read = 0.0
  for step in range(1, steps + 1):
    t0 = time.perf_counter()
    lazy = batches.train_batch(data, parts, batch_size, seed, step, lazy=True)
    t1 = time.perf_counter()
    batch = _materialise(lazy)
    choose, read = choose + t1 - t0, read + time.perf_counter() - t1
  return {"choose_seconds": choose, "read_seconds": read, "batch": batch}


def benchmark(num_images: int, steps: int, batch_size: int, log=print):
  """Prepare throughput for both storage types, then training-input throughput; logs lines."""
  tfds_builders.quiet()
  root = tempfile.mkdtemp(prefix="rerank-bench-")
  try:
    src, out = os.path.join(root, "src"), os.path.join(root, "data")
    size = write_release(src, num_images)
    log(f"release: {num_images} images, 10-100 regions each, TSV {size / 2**20:.0f} MiB")
    for dtype in ("float16", "float32"):
      t0 = time.perf_counter()
      summary = prepare.prepare("flickr30k_butd", src, out, dtype=dtype, overwrite=True)
      dt = time.perf_counter() - t0
      n = sum(s["images"] for s in summary["splits"].values())
      log(f"prepare ({dtype}): {n / dt:.0f} images/s ({size / 2**20 / dt:.0f} MiB of TSV/s, "
          f"{dt:.1f}s for {n} images)")

    cfg = ml_collections.ConfigDict(dict(
        dataset=dict(name="flickr30k_butd", data_dir=out, tokenizer=os.path.join(src, "vocab.txt")),
        max_regions=50, max_text_len=70))
    t0 = time.perf_counter()
    data, _ = datasets.load_split(cfg, "train", datasets.get_tokenizer(cfg))
    log(f"load_split (read + tokenise {data.num_texts} captions): "
        f"{time.perf_counter() - t0:.2f}s")
    # A joint mode's step: a BE batch (captions + images) and a CE batch (2B pairs).
    timed = time_training_input(data, ("be", "ce"), batch_size, steps)
    dt = timed["choose_seconds"] + timed["read_seconds"]
    batch = timed["batch"]
    log(f"training input (batch {batch_size}, BE {batch['be']['regions'].shape} + CE "
        f"{batch['ce']['regions'].shape} regions, train_batch(lazy=True) + region reads): "
        f"{steps / dt:.2f} batches/s ({timed['choose_seconds'] / dt:.1%} choosing rows and "
        f"negatives, {timed['read_seconds'] / dt:.1%} reading region features)")
  finally:
    shutil.rmtree(root, ignore_errors=True)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("images", "steps", "batch"):
    if getattr(FLAGS, name) < 1:
      cli.fail(f"--{name}: expected a positive integer; found {getattr(FLAGS, name)}")
  benchmark(FLAGS.images, FLAGS.steps, FLAGS.batch, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
  cli.run(main, define_flags)
