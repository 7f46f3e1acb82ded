"""What every paper row shares: the authors' released optimiser settings, input sizes, data and
weights locations, the config argument parser, and the smoke-run shrink.

A row file builds on `base`, states its own mode, learning rate, steps, batch size, rerank depth
and losses, and ends with `finish`:

  c, arg = common.base(arg, dataset="coco")
  c.mode = "joint_alternate"
  c.lr = 5e-5
  ...
  return common.finish(c, arg)

Fields are those of configs/demo.py (the trainer's field set), with these values on top.
"""

import ml_collections

from configs import common
from configs import demo
from rerank.evaluation import paper_tables


def parse_arg(arg: str | None, dataset: str) -> ml_collections.ConfigDict:
  """Arguments after the config file's colon, comma separated.

  `runlocal`: synthetic_scenes, tiny model, 2 steps, no weights or data (a smoke run that keeps
  the row's model layout, dtype, mode, losses and language);
  `data_dir=DIR` (default data/tfds); `init_from=DIR` (default the converted checkpoint);
  `split=NAME` (evaluation split; COCO: test, test1k, test@5x1k); `k=N` (rerank depth, default
  the row's); `lang=L` (Multi30k: captions of one language).
  """
  _, split = paper_tables.DATASETS[dataset]
  init_from = "checkpoints/m3p-base" if dataset == "multi30k" else "checkpoints/oscar-base-ir"
  return common.parse_arg(arg, runlocal=False, data_dir="data/tfds", init_from=init_from,
                          split=split, k=0, lang="")


# What sets the rows' models apart, kept by the smoke runs: M3P (Multi30k) reads regions first,
# OSCAR (COCO, Flickr30k) text first; all train in bfloat16 (float32 master weights).
DTYPE = "bfloat16"
LAYOUTS = {"m3p": dict(visual="m3p", order="image_first"),
           "oscar": dict(visual="oscar", order="text_first")}
# A smoke run has no checkpoint to supply the architecture, so it also states M3P's position
# embedding over the whole joint sequence and its lack of token types.
SMOKE_LAYOUTS = {"m3p": dict(LAYOUTS["m3p"], positions="sequence", type_vocab_size=0),
                 "oscar": dict(LAYOUTS["oscar"], positions="text")}


def family(dataset: str) -> str:
  """The pretrained model family of a paper dataset's rows: m3p (Multi30k) or oscar."""
  return "m3p" if dataset == "multi30k" else "oscar"


def base(arg: str | None, dataset: str):
  """(config, parsed arguments): the shared settings for a row on `dataset` (coco, flickr30k,
  multi30k); with `runlocal`, the demo's tiny synthetic run instead of the data and model, with
  the row's model layout, dtype and language."""
  if dataset not in paper_tables.DATASETS:
    raise ValueError(f"paper dataset {dataset!r} unknown; expected one of "
                     f"{sorted(paper_tables.DATASETS)}")
  arg = parse_arg(arg, dataset)
  c = demo.get_config("runlocal" if arg.runlocal else "size=base")
  # The authors' optimiser: AdamW, linear decay to 0 without warmup, clipping per update.
  c.seed = 123456789
  c.warmup_steps = 0
  c.weight_decay = 0.05
  c.adam_eps = 1e-6
  c.clip_norm = 1.0
  c.loss.margin = 0.1  # VSE++ margin
  # Multi30k: evaluation in one language (`lang=en|de|fr|cs`; it also filters training captions,
  # so train with lang unset, then evaluate per language, see docs/REPRODUCE.md). A smoke run
  # records it too (synthetic_scenes captions are all English: nothing is filtered).
  c.dataset.language = arg.lang
  m3p = family(dataset) == "m3p"
  if arg.runlocal:  # the demo's tiny model, in the row's layout and dtype
    c.model.update(dtype=DTYPE, **SMOKE_LAYOUTS[family(dataset)])
    return c, arg

  c.dataset.name = paper_tables.DATASETS[dataset][0]
  c.dataset.data_dir = arg.data_dir
  c.dataset.num_dev_images = 0  # the whole dev split (Flickr30k val, COCO minival) for model choice
  c.init_from = arg.init_from  # the converted checkpoint also supplies the tokenizer
  c.max_text_len = 128 if m3p else 72  # M3P: up to 128 pieces; OSCAR: 70 wordpieces + 2 specials
  c.max_regions = 50
  # The checkpoint supplies the architecture; these record its layout and set mixed precision.
  c.model = common.model_config("base", dtype=DTYPE, **LAYOUTS[family(dataset)])
  c.log_every = 100
  c.checkpoint_every = 1000
  c.eval_every = 1000
  c.eval.split = arg.split
  c.eval.batch_size = 512
  # CE rows score the full cross product, as the authors; RR reranks every query.
  c.eval.update(ce_queries_t2i=0, ce_queries_i2t=0, rr_queries_t2i=0, rr_queries_i2t=0)
  # Dev evaluation during training (every eval_every steps, for the best checkpoint): rows with
  # a BE use the BE (seconds); the CE-only rows score CE pairs, so, as the authors evaluate
  # their CE on a small dev sample, they take a seeded sample of dev queries against the whole
  # dev corpus: 100 * N + 20 * 5N = 200N pairs for N dev images (Flickr30k: ~200k, 2% of the
  # full dev cross product). docs/REPRODUCE.md counts its cost.
  c.eval.dev_ce_queries_t2i = 100
  c.eval.dev_ce_queries_i2t = 20
  return c, arg


def finish(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """Applies `k=N` over the row's rerank depth and, with `runlocal`, shrinks the run to 2 steps."""
  if arg.k:
    c.eval.k = arg.k
  if arg.runlocal:
    c.total_steps = 2
    c.checkpoint_every = 2
    c.eval_every = 0
    c.batch_size = 8
    c.eval.k = min(c.eval.k, 5)
    if c.hard_negatives.every:  # ANCE rows: mine every step, from a tiny corpus
      c.hard_negatives.update(every=1, top=5)
  return c
