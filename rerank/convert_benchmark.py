r"""Benchmark: converting a 12-layer base-size BERT checkpoint (time and peak memory).

  python -m rerank.convert_benchmark [--format=safetensors|bin|both] [--family=bert|oscar]

Writes a random BERT-base (vocab 30522, 768 wide, 12 layers; OSCAR adds the 2054->768 image
embedding) to a temporary directory, then runs `python -m rerank.convert` on it in a fresh
process and prints the checkpoint size, the wall time, the converting process's peak RSS and
the peak RSS of a process that only imports the same libraries (the baseline the converter
cannot avoid). The target (issue 3): under 60 s and under 2x the checkpoint size.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

from rerank import cli

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_enum("format", "both", ["safetensors", "bin", "both"],
                    "Checkpoint format(s) to convert.")
  flags.DEFINE_enum("family", "oscar", ["bert", "oscar"], "Checkpoint family to write and convert.")


_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


def _state(family: str) -> dict:
  rng = np.random.default_rng(0)
  h, m, p = 768, 3072, "bert."
  shapes = {p + "embeddings.word_embeddings.weight": (30522, h),
            p + "embeddings.position_embeddings.weight": (512, h),
            p + "embeddings.token_type_embeddings.weight": (2, h), p + "embeddings.LayerNorm.weight": (h,),
            p + "embeddings.LayerNorm.bias": (h,), p + "pooler.dense.weight": (h, h),
            p + "pooler.dense.bias": (h,)}
  for i in range(12):
    k = f"{p}encoder.layer.{i}."
    for name, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                        ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                        ("intermediate.dense", (m, h)), ("output.dense", (h, m)),
                        ("attention.output.LayerNorm", (h,)), ("output.LayerNorm", (h,))):
      shapes[k + name + ".weight"], shapes[k + name + ".bias"] = shape, shape[:1]
  if family == "oscar":
    shapes.update({p + "img_embedding.weight": (h, 2054), p + "img_embedding.bias": (h,)})
  return {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}


def _write(root: str, family: str, fmt: str) -> tuple[str, int]:
  src = os.path.join(root, f"src_{fmt}")
  os.makedirs(src)
  state = _state(family)
  config = dict(_BASE, img_feature_dim=2054) if family == "oscar" else _BASE
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(src, "vocab.txt"), "w") as f:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    f.write("\n".join(specials + [f"w{i}" for i in range(30517)]) + "\n")
  if fmt == "safetensors":
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    path = os.path.join(src, "model.safetensors")
    st_numpy.save_file(state, path)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    path = os.path.join(src, "pytorch_model.bin")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  return src, os.path.getsize(path)


def _run(args: list[str], env: dict) -> tuple[float, float, int]:
  """(seconds, peak RSS in bytes, return code) of `python args` in a fresh process."""
  code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; rc = 0\n"
          "try:\n  runpy.run_module(sys.argv[0], run_name='__main__')\n"
          "except SystemExit as e:\n  rc = e.code or 0\n"
          "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
          "sys.exit(rc)\n")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        env=env)
  seconds = time.perf_counter() - t0
  peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
  if proc.returncode or not peak:
    print(proc.stdout, proc.stderr, file=sys.stderr)
  return seconds, int(peak[-1].split()[1]) * 1024 if peak else 0, proc.returncode


def benchmark(family: str, formats: list[str], log=print) -> list[dict]:
  """Writes, converts and measures one checkpoint per format; logs a line, returns a dict, each."""
  out = []
  with tempfile.TemporaryDirectory() as root:
    # The baseline modules are written to `root`, so child processes import from there too.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    for fmt in formats:
      # Baseline: a process that imports what this conversion imports and converts nothing.
      with open(os.path.join(root, f"baseline_{fmt}.py"), "w") as f:
        f.write("import jax, orbax.checkpoint, transformers, tokenizers\nimport rerank.convert\n"
                + ("import torch\n" if fmt == "bin" else ""))
      _, base_rss, _ = _run([f"baseline_{fmt}"], env)
      src, size = _write(root, family, fmt)
      dst = os.path.join(root, f"dst_{fmt}")
      seconds, rss, rc = _run(["rerank.convert", f"--family={family}", f"--src={src}",
                               f"--dst={dst}"], env)
      extra = rss - base_rss
      log(f"{family} base, {fmt}: checkpoint {size / 2**20:.0f} MiB | convert {seconds:.1f} s "
          f"(rc={rc}) | peak RSS {rss / 2**20:.0f} MiB = {rss / size:.2f}x checkpoint; imports "
          f"alone {base_rss / 2**20:.0f} MiB, the rest {extra / 2**20:.0f} MiB = "
          f"{extra / size:.2f}x | target < 60 s and < 2x")
      out.append(dict(format=fmt, checkpoint_bytes=size, seconds=seconds, returncode=rc,
                      peak_rss=rss, baseline_rss=base_rss))
  return out


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  formats = ["safetensors", "bin"] if FLAGS.format == "both" else [FLAGS.format]
  benchmark(FLAGS.family, formats, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
  cli.run(main, define_flags)
