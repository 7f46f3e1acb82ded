"""The paper's experiments (Geigle et al., TACL 2022) as configs, and its tables as row lists.

`paper_config(dataset, method, arg)` builds one table row's training config from the demo
config's field set (so every paper config has exactly the fields the trainer knows) with the
authors' hyperparameters (shared/DESIGN.md §2). `TABLES` says which config and which
evaluated method fills each row of each table, and the reference numbers where the authors'
README gives them; `python -m rerank.reproduce` reads it.
"""

import dataclasses
import importlib.util
import os

from rerank import config_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# dataset key -> (prepared TFDS name, default evaluation split).
DATASETS = {
    "flickr30k": ("flickr30k_butd", "test"),
    "coco": ("coco_oscar", "test"),  # 5k; split=test1k (authors' fold) or test@5x1k (5-fold mean)
    "multi30k": ("multi30k", "test_2016"),  # M3P; trained on all languages, evaluated per language
}
# dataset key -> methods with a config file (Multi30k: the paper reports the joint model only).
DATASET_METHODS = {"flickr30k": ("be", "ce", "separate", "joint", "joint_ance"),
                   "coco": ("be", "ce", "separate", "joint", "joint_ance"),
                   "multi30k": ("joint",)}

# method -> (trainer mode, lr, total steps, ANCE hard negatives). Authors' released configs.
METHODS = {
    "be": ("be", 2e-5, 30_000, False),
    "ce": ("ce", 5e-5, 100_000, False),
    # The paper's Separate row pairs a BE-only and a CE-only model; `separate` trains both
    # weight sets side by side in one run at one lr and step count (Joint's), see REPRODUCE.md.
    "separate": ("separate", 5e-5, 30_000, False),
    "joint": ("joint_alternate", 5e-5, 30_000, False),
    "joint_ance": ("joint_alternate", 2e-5, 15_000, True),  # 15 epochs x 1k steps
}


def _demo_config(arg):
  spec = importlib.util.spec_from_file_location("rerank_demo_config",
                                                os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def paper_config(dataset: str, method: str, arg: str | None = None):
  """One paper row's config. Arguments (after the config file's colon, comma separated):

  `runlocal`: synthetic_scenes, tiny model, 2 steps, no weights or data (a smoke run);
  `data_dir=DIR` (default data/tfds), `init_from=DIR` (default checkpoints/oscar-base-ir),
  `split=NAME` (evaluation split; COCO: test, test1k, test@5x1k), `k=N` (rerank depth).
  """
  if dataset not in DATASETS:
    raise ValueError(f"paper dataset {dataset!r} unknown; expected one of {sorted(DATASETS)}")
  if method not in DATASET_METHODS[dataset]:
    raise ValueError(f"paper method {method!r} for {dataset}: expected one of "
                     f"{sorted(DATASET_METHODS[dataset])}")
  name, default_split = DATASETS[dataset]
  m3p = dataset == "multi30k"
  arg = config_utils.parse_arg(
      arg, runlocal=False, data_dir="data/tfds",
      init_from="checkpoints/m3p-base" if m3p else "checkpoints/oscar-base-ir",
      split=default_split, k=20, lang="")
  mode, lr, steps, ance = METHODS[method]
  c = _demo_config(f"runlocal,mode={mode}" if arg.runlocal else f"mode={mode},size=base")
  c.seed = 123456789
  c.batch_size = 128
  c.lr = lr
  c.total_steps = steps
  c.warmup_steps = 0
  c.weight_decay = 0.05
  c.adam_eps = 1e-6
  c.clip_norm = 1.0
  c.loss.be = "vsepp"
  c.loss.margin = 0.1
  c.loss.ce = "pairwise"
  c.eval.k = c.search.k = arg.k
  if ance:  # top-50 of the current BE, re-mined every 1k-step epoch; CE p=0.05; 7 BE negatives
    c.hard_negatives.update(every=1000, start=0, top=50, ce_prob=0.05, be_negatives=7)
  if arg.runlocal:
    c.total_steps = 2
    c.checkpoint_every = 2
    c.eval_every = 0
    c.batch_size = 8
    c.eval.k = min(arg.k, 5)
    if ance:
      c.hard_negatives.update(every=1, top=5)
    return c
  c.dataset.name = name
  c.dataset.data_dir = arg.data_dir
  c.dataset.num_dev_images = 0  # the whole dev split (Flickr30k val, COCO minival) for model choice
  c.init_from = arg.init_from  # the converted checkpoint also supplies the tokenizer
  c.max_text_len = 128 if m3p else 72  # M3P: up to 128 pieces; OSCAR: 70 wordpieces + 2 specials
  c.max_regions = 50
  # The checkpoint supplies the architecture; these record its layout and set mixed precision.
  layout = dict(visual="m3p", order="image_first") if m3p else {}
  c.model = config_utils.model_config("base", dtype="bfloat16", **layout)
  # Multi30k: evaluation in one language (`lang=en|de|fr|cs`; it also filters training captions,
  # so train with lang unset, then evaluate per language, see docs/REPRODUCE.md).
  c.dataset.language = arg.lang
  c.log_every = 100
  c.checkpoint_every = 1000
  c.eval_every = 1000
  c.eval.split = arg.split
  c.eval.batch_size = 512
  # CE rows score the full cross product, as the authors; RR reranks every query.
  c.eval.update(ce_queries_t2i=0, ce_queries_i2t=0, rr_queries_t2i=0, rr_queries_i2t=0)
  return c


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row: the config that trains it and the evaluated method that fills it."""
  label: str
  config: str  # path relative to the repository, with its arguments
  method: str  # BE, CE or RR in results.json
  reference_t2i: tuple[float, float, float] | None = None  # authors' image retrieval R@1/5/10
  k: int | None = None  # the rerank depth the run must report (k ablation)
  language: str | None = None  # the query language the run must report (Multi30k)
  reference_mr: float | None = None  # authors' mR where only that is published
  # Evaluated on another dataset / split than the config's (zero-shot, enlarged corpus).
  eval_dataset: str | None = None
  eval_split: str | None = None


def _rows(dataset, split_arg, refs):
  out = []
  for key, methods in (("be", ("BE",)), ("ce", ("CE",)), ("separate", ("BE", "RR")),
                       ("joint", ("BE", "RR")), ("joint_ance", ("BE", "RR"))):
    for m in methods:
      cfg = f"configs/paper/{dataset}_{key}.py" + (f":split={split_arg}" if split_arg else "")
      out.append(Row(f"{key} {m}", cfg, m, refs.get((key, m))))
  return out


def _k_rows(dataset):
  return [Row(f"k{k} RR", f"configs/paper/{dataset}_joint.py:k={k}", "RR", k=k)
          for k in (10, 20, 50, 100)]


def _transfer_rows(dataset, eval_dataset, eval_split):
  return [Row(f"joint {m}", f"configs/paper/{dataset}_joint.py", m, eval_dataset=eval_dataset,
              eval_split=eval_split) for m in ("BE", "RR")]


# Flickr30k test images and captions plus COCO 5k test and Conceptual Captions dev images as
# distractors (rerank/data/eval_sets.py); queries and relevance from Flickr30k only.
ENLARGED_FLICKR = "test+coco_oscar:test+cc_dev:dev"

# Reference numbers: authors' README, Joint model, image retrieval (t2i) R@1/R@5/R@10.
TABLES = {
    "flickr30k": ("Flickr30k test (1k images, 5k captions), OSCAR",
                  _rows("flickr30k", "", {("joint", "BE"): (71.6, 91.5, 95.0),
                                          ("joint", "RR"): (76.4, 93.6, 96.2)})),
    "coco5k": ("MSCOCO 5k test, OSCAR",
               _rows("coco", "", {("joint", "BE"): (52.5, 80.0, 88.0),
                                  ("joint", "RR"): (54.7, 81.3, 88.9)})),
    "coco1k": ("MSCOCO 1k test (the authors' single fold), OSCAR", _rows("coco", "test1k", {})),
    "coco5x1k": ("MSCOCO 1k test, mean over 5 folds, OSCAR", _rows("coco", "test@5x1k", {})),
    "zeroshot_coco_to_flickr30k": ("Zero-shot: trained on MSCOCO, tested on Flickr30k test",
                                   _transfer_rows("coco", "flickr30k_butd", "test")),
    "zeroshot_flickr30k_to_coco": ("Zero-shot: trained on Flickr30k, tested on MSCOCO 5k test",
                                   _transfer_rows("flickr30k", "coco_oscar", "test")),
    "flickr30k_enlarged": ("Flickr30k test enlarged with COCO 5k test + CC dev images",
                           _transfer_rows("flickr30k", None, ENLARGED_FLICKR)),
    # Authors' README: Joint model mR per language (DESIGN does not say BE or RR; shown on RR).
    "multi30k": ("Multi30k test_2016, M3P, Joint, per query language",
                 [Row(f"{lang} {m}", f"configs/paper/multi30k_joint.py:lang={lang}", m,
                      language=lang, reference_mr=ref if m == "RR" else None)
                  for lang, ref in (("en", 83.0), ("de", 79.2), ("fr", 75.9), ("cs", 74.0))
                  for m in ("BE", "RR")]),
    # k ablation: one joint workdir re-evaluated with --config.eval.k=K (docs/REPRODUCE.md).
    "flickr30k_k": ("Flickr30k test, Joint RR by rerank depth k", _k_rows("flickr30k")),
    "coco5k_k": ("MSCOCO 5k test, Joint RR by rerank depth k", _k_rows("coco")),
}
