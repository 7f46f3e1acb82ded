"""The paper's tables as data: which config and evaluated method fills each row, and the
published numbers to compare with.

"Retrieve Fast, Rerank Smart" (Geigle et al., TACL 2022). `python -m rerank.reproduce` reads
`TABLES`; the config files named in the rows (configs/paper/) train the runs, or re-evaluate one
(k ablation, fusion, other splits). The published numbers, with the paper table or the authors'
release each comes from, are data in `paper_numbers`; a cell without one is printed "missing",
never filled from anywhere else.
"""

import dataclasses

from rerank.evaluation import paper_numbers as published

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
  """One table row: the config that trains (or re-evaluates) it and the evaluated method that
  fills it, with the published cells to compare with."""
  label: str
  config: str  # path relative to the repository, with its arguments
  method: str  # BE, CE or RR in results.json
  # Published cells by reproduce column ("t2i R@1", "mR", ...); absent cells print "missing".
  reference: dict = dataclasses.field(default_factory=dict)
  k: int | None = None  # the rerank depth the run must report (k ablation)
  language: str | None = None  # the query language the run must report (Multi30k)
  # (config.eval.fusion, config.eval.fusion_weight) the run must report (fusion ablation).
  fusion: tuple[str, float] | None = None
  # Evaluated on another dataset / split than the config's (zero-shot, enlarged corpus).
  eval_dataset: str | None = None
  eval_split: str | None = None

  @property
  def key(self) -> str:
    """The row's key in `reproduce --workdirs` (the label's first word)."""
    return self.label.split()[0]


def _rows(dataset, split_arg, refs):
  out = []
  for key, methods in (("be", ("BE",)), ("ce", ("CE",)), ("separate", ("BE", "RR")),
                       ("joint", ("BE", "RR")), ("joint_ance", ("BE", "RR"))):
    for m in methods:
      cfg = f"configs/paper/{dataset}_{key}.py" + (f":split={split_arg}" if split_arg else "")
      out.append(Row(f"{key} {m}", cfg, m, refs.get((key, m), {})))
  return out


def _k_rows(dataset, refs):
  return [Row(f"k{k} RR", f"configs/paper/{dataset}_joint.py:k={k}", "RR", refs.get(k, {}), k=k)
          for k in (10, 20, 50, 100)]


def _transfer_rows(dataset, eval_dataset, eval_split):
  return [Row(f"joint {m}", f"configs/paper/{dataset}_joint.py", m, eval_dataset=eval_dataset,
              eval_split=eval_split) for m in ("BE", "RR")]


# Table 9's rows: key -> (config, (fusion, weight)). Each config is flickr30k_joint.py with the
# fusion set; the rows re-evaluate one trained Flickr30k joint workdir.
FUSION_ROWS = {
    "standard": ("configs/paper/flickr30k_fusion_standard.py", ("standard", 0.0)),
    "w0.1": ("configs/paper/flickr30k_fusion_w01.py", ("combination", 0.1)),
    "w0.9": ("configs/paper/flickr30k_fusion_w09.py", ("combination", 0.9)),
}


def _fusion_rows():
  return [Row(f"{key} RR", config, "RR", published.FLICKR30K_BY_FUSION.get(fusion, {}),
              fusion=fusion) for key, (config, fusion) in FUSION_ROWS.items()]


# Flickr30k test images and captions plus COCO 5k test and Conceptual Captions dev images as
# distractors (rerank/data/eval_sets.py); queries and relevance from Flickr30k only.
ENLARGED_FLICKR = "test+coco_oscar:test+cc_dev:dev"

# name -> (title, rows). Published cells come from `paper_numbers` (which names each one's
# paper table or the authors' release); tables without any print "missing" in every reference.
TABLES = {
    # The paper's Flickr30k results (OSCAR); published: Joint+Coop image retrieval (release).
    "flickr30k": ("Flickr30k test (1k images, 5k captions), OSCAR",
                  _rows("flickr30k", "", published.FLICKR30K)),
    # The paper's MSCOCO 5k results (its Table 1, R@1; Joint+Coop R@5/R@10 from the release).
    "coco5k": ("MSCOCO 5k test, OSCAR", _rows("coco", "", published.COCO5K)),
    # The paper's MSCOCO 1k results, on the authors' single fold (OSCAR's test_img_keys_1k.tsv);
    # no published value recovered.
    "coco1k": ("MSCOCO 1k test (the authors' single fold), OSCAR", _rows("coco", "test1k", {})),
    # The 1k convention elsewhere (mean over five folds), for comparison with other papers.
    "coco5x1k": ("MSCOCO 1k test, mean over 5 folds, OSCAR", _rows("coco", "test@5x1k", {})),
    # The paper's zero-shot transfer experiments; no published value recovered.
    "zeroshot_coco_to_flickr30k": ("Zero-shot: trained on MSCOCO, tested on Flickr30k test",
                                   _transfer_rows("coco", "flickr30k_butd", "test")),
    "zeroshot_flickr30k_to_coco": ("Zero-shot: trained on Flickr30k, tested on MSCOCO 5k test",
                                   _transfer_rows("flickr30k", "coco_oscar", "test")),
    # The paper's enlarged test set (distractor images from other datasets); none recovered.
    "flickr30k_enlarged": ("Flickr30k test enlarged with COCO 5k test + CC dev images",
                           _transfer_rows("flickr30k", None, ENLARGED_FLICKR)),
    # The paper's multilingual results (M3P); published: Joint mR per language (release; it
    # does not say BE or RR, shown on RR).
    "multi30k": ("Multi30k test_2016, M3P, Joint, per query language",
                 [Row(f"{lang} {m}", f"configs/paper/multi30k_joint.py:lang={lang}", m,
                      {"mR": ref} if m == "RR" else {}, language=lang)
                  for lang, ref in published.MULTI30K_MR.items() for m in ("BE", "RR")]),
    # The paper's rerank-depth ablation (MSCOCO 5k; its Table 8): one joint workdir re-evaluated
    # with --config.eval.k=K (docs/REPRODUCE.md). Flickr30k: none recovered.
    "flickr30k_k": ("Flickr30k test, Joint RR by rerank depth k", _k_rows("flickr30k", {})),
    "coco5k_k": ("MSCOCO 5k test, Joint RR by rerank depth k",
                 _k_rows("coco", published.COCO5K_BY_K)),
    # The paper's Table 9: the BE score added to the CE score when reranking (Flickr30k test,
    # Joint): one joint workdir re-evaluated with each fusion config.
    "flickr30k_fusion": ("Flickr30k test, Joint RR by score fusion (CE alone; (1 - w) * CE + "
                         "w * cosine)", _fusion_rows()),
}
