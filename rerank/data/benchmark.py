r"""Prints prepare throughput (images/s) and input-pipeline throughput (batches/s).

  python -m rerank.data.benchmark [--images=1000] [--steps=30] [--batch=128]

Writes a synthetic Flickr30k-format release (bottom-up-attention TSV with 10-100 regions per
image, flickr30k_entities Sentences with 5 captions, split lists) to a temporary directory,
times `prepare` on it for float16 and float32 storage, then times the training input of the
prepared split at base-size inputs (50 regions, 70 tokens, joint BE + CE batches), with and
without prefetching, on one host. TSV writing is not timed. All figures of one run come from
the same machine and files, so their ratios compare like with like.
"""

import base64
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np

from rerank.data import datasets
from rerank.data import pipeline
from rerank.data import prepare
from rerank.data import tfds_builders

_IMAGES = flags.DEFINE_integer("images", 1000, "Images in the synthetic release (train split).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed pipeline steps.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch (captions per step).")
_WORDS = [f"word{i}" for i in range(500)]


def write_release(root: str, num_images: int, seed: int = 0) -> int:
  """A Flickr30k-format release; returns the TSV size in bytes."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "Sentences"))
  keys = list(range(1000, 1000 + num_images))
  with open(os.path.join(root, "train.txt"), "w") as f:
    f.write("".join(f"{k}\n" for k in keys))
  for split in ("val", "test"):
    with open(os.path.join(root, f"{split}.txt"), "w") as f:
      f.write(f"{keys[0]}\n")
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


def main(argv):
  del argv
  tfds_builders.quiet()
  root = tempfile.mkdtemp(prefix="rerank-bench-")
  try:
    src, out = os.path.join(root, "src"), os.path.join(root, "data")
    size = write_release(src, _IMAGES.value)
    print(f"release: {_IMAGES.value} images, 10-100 regions each, TSV {size / 2**20:.0f} MiB")
    for dtype in ("float16", "float32"):
      t0 = time.perf_counter()
      summary = prepare.prepare("flickr30k_butd", src, out, dtype=dtype, overwrite=True)
      dt = time.perf_counter() - t0
      n = sum(s["images"] for s in summary["splits"].values())
      print(f"prepare ({dtype}): {n / dt:.0f} images/s ({size / 2**20 / dt:.0f} MiB of TSV/s, "
            f"{dt:.1f}s for {n} images)")

    cfg = ml_collections.ConfigDict(dict(
        dataset=dict(name="flickr30k_butd", data_dir=out, tokenizer=os.path.join(src, "vocab.txt")),
        max_regions=50, max_text_len=70))
    t0 = time.perf_counter()
    data, _ = datasets.load_split(cfg, "train", datasets.get_tokenizer(cfg))
    print(f"load_split (read + tokenise {data.num_texts} captions): "
          f"{time.perf_counter() - t0:.2f}s")
    for prefetch in (0, 2):
      it = pipeline.HostIterator(data, "joint_alternate", _BATCH.value, seed=0,
                                 host=pipeline.Host(0, 1), prefetch=prefetch)
      next(it)  # warm-up: thread start, first reads
      t0 = time.perf_counter()
      for _ in range(_STEPS.value):
        batch = next(it)
      dt = time.perf_counter() - t0
      it.close()
      print(f"pipeline (batch {_BATCH.value}, BE {batch['be']['regions'].shape} + CE "
            f"{batch['ce']['regions'].shape} regions, prefetch={prefetch}): "
            f"{_STEPS.value / dt:.2f} batches/s")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
