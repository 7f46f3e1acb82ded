"""The paper's tables as data: which config and evaluated method fills each row, and the
published numbers to compare with.

"Retrieve Fast, Rerank Smart" (Geigle et al., TACL 2022). `python -m rerank.reproduce` reads
`TABLES`; the config files named in the rows (configs/paper/) train the runs. Reference numbers
come from the authors' repository README (UKPLab/MMT-Retrieval, "Expected Results with our
Fine-Tuned Models": their released Joint checkpoints); cells not published there are left
empty, and `reproduce` prints "missing" rather than a number from anywhere else.
"""

import dataclasses

# dataset key (the prefix of configs/paper/KEY_*.py) -> (prepared TFDS name, evaluation split).
DATASETS = {
    "flickr30k": ("flickr30k_butd", "test"),
    "coco": ("coco_oscar", "test"),  # 5k; split=test1k (authors' fold) or test@5x1k (5-fold mean)
    "multi30k": ("multi30k", "test_2016"),  # M3P; trained on all languages, evaluated per language
}
# dataset key -> methods with a config file (Multi30k: the paper reports the joint model only).
DATASET_METHODS = {"flickr30k": ("be", "ce", "separate", "joint", "joint_ance"),
                   "coco": ("be", "ce", "separate", "joint", "joint_ance"),
                   "multi30k": ("joint",)}


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

# name -> (title, rows). Reference numbers: the authors' README, Joint model, image retrieval
# (t2i) R@1/R@5/R@10, or mR per language for Multi30k.
TABLES = {
    # The paper's Flickr30k results (OSCAR); reference: the README's Flickr30k Joint rows.
    "flickr30k": ("Flickr30k test (1k images, 5k captions), OSCAR",
                  _rows("flickr30k", "", {("joint", "BE"): (71.6, 91.5, 95.0),
                                          ("joint", "RR"): (76.4, 93.6, 96.2)})),
    # The paper's MSCOCO 5k results (its Table 1); reference: the README's MSCOCO Joint rows.
    "coco5k": ("MSCOCO 5k test, OSCAR",
               _rows("coco", "", {("joint", "BE"): (52.5, 80.0, 88.0),
                                  ("joint", "RR"): (54.7, 81.3, 88.9)})),
    # The paper's MSCOCO 1k results, on the authors' single fold (OSCAR's test_img_keys_1k.tsv);
    # no published reference in the README.
    "coco1k": ("MSCOCO 1k test (the authors' single fold), OSCAR", _rows("coco", "test1k", {})),
    # The 1k convention elsewhere (mean over five folds), for comparison with other papers.
    "coco5x1k": ("MSCOCO 1k test, mean over 5 folds, OSCAR", _rows("coco", "test@5x1k", {})),
    # The paper's zero-shot transfer experiments; no published reference in the README.
    "zeroshot_coco_to_flickr30k": ("Zero-shot: trained on MSCOCO, tested on Flickr30k test",
                                   _transfer_rows("coco", "flickr30k_butd", "test")),
    "zeroshot_flickr30k_to_coco": ("Zero-shot: trained on Flickr30k, tested on MSCOCO 5k test",
                                   _transfer_rows("flickr30k", "coco_oscar", "test")),
    # The paper's enlarged test set (distractor images from other datasets); no README reference.
    "flickr30k_enlarged": ("Flickr30k test enlarged with COCO 5k test + CC dev images",
                           _transfer_rows("flickr30k", None, ENLARGED_FLICKR)),
    # The paper's multilingual results (M3P); reference: the README's Joint mR per language
    # (it does not say BE or RR; shown on RR).
    "multi30k": ("Multi30k test_2016, M3P, Joint, per query language",
                 [Row(f"{lang} {m}", f"configs/paper/multi30k_joint.py:lang={lang}", m,
                      language=lang, reference_mr=ref if m == "RR" else None)
                  for lang, ref in (("en", 83.0), ("de", 79.2), ("fr", 75.9), ("cs", 74.0))
                  for m in ("BE", "RR")]),
    # The paper's rerank-depth ablation (MSCOCO 5k; its Table 8): one joint workdir re-evaluated
    # with --config.eval.k=K (docs/REPRODUCE.md). No README reference.
    "flickr30k_k": ("Flickr30k test, Joint RR by rerank depth k", _k_rows("flickr30k")),
    "coco5k_k": ("MSCOCO 5k test, Joint RR by rerank depth k", _k_rows("coco")),
}
