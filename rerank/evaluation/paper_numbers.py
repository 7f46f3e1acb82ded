"""The paper's published numbers, as data, each with where it was printed.

"Retrieve Fast, Rerank Smart" (Geigle et al., TACL 2022, arXiv 2103.11920). Two sources:
- the paper's tables (Tables 1, 3, 4, 8 and 9 of the arXiv version);
- the authors' release: the README of UKPLab/MMT-Retrieval, "Expected Results with our
  Fine-Tuned Models" (their released Joint+Coop checkpoints). Where both give a cell they agree.
Only the cells below are confirmed; every other cell of the paper (Table 1's R@5/R@10 beyond the
two release rows, text retrieval R@5/R@10, Flickr30k rows other than Joint+Coop, the baselines,
Tables 2 and 5-7) is absent on purpose, and `rerank.reproduce` prints `missing` for it.

Names: cells are keyed like the columns of `rerank.reproduce` ("t2i R@1" = image retrieval,
the paper's IR; "i2t R@1" = text retrieval, TR; "mR" = mean of the six recalls). Rows: BE
(bi-encoder), CE (cross-encoder over all pairs), Sep+Coop (separately trained BE retrieves the
top k, a separately trained CE reranks: our `separate` RR), Joint+BE / Joint+Coop (the
shared-weight model as BE / retrieving and reranking: our `joint` BE / RR). k = 20 unless said.
"""

import dataclasses

TABLE_1 = "paper Table 1"
TABLE_3 = "paper Table 3"
TABLE_4 = "paper Table 4"
TABLE_8 = "paper Table 8"
TABLE_9 = "paper Table 9"
RELEASE = "authors' release"
SOURCES = {
    TABLE_1: "Geigle et al. 2022, Table 1: MSCOCO 5k test, OSCAR base, R@1 (IR and TR)",
    TABLE_3: "Geigle et al. 2022, Table 3: latency per query over 50k images "
             "(the hardware is not stated in the sources we have)",
    TABLE_4: "Geigle et al. 2022, Table 4: time to evaluate MSCOCO 5k test, embeddings not "
             "cached, one V100",
    TABLE_8: "Geigle et al. 2022, Table 8: rerank depth k, Joint+Coop, MSCOCO 5k, R@1",
    TABLE_9: "Geigle et al. 2022, Table 9: adding the BE score to the CE score, Joint+Coop, "
             "Flickr30k, IR R@1",
    RELEASE: "UKPLab/MMT-Retrieval README, 'Expected Results with our Fine-Tuned Models' "
             "(released Joint+Coop checkpoints)",
}


@dataclasses.dataclass(frozen=True)
class Published:
  """One published cell: the value and where it was printed (a key of SOURCES)."""
  value: float
  source: str


def _cells(source: str, **values: float) -> dict[str, Published]:
  """{"t2i R@1": Published(...)} from keyword names like t2i_R1 (the reproduce column names)."""
  out = {}
  for name, value in values.items():
    direction, _, metric = name.partition("_")
    key = f"{direction} {metric.replace('R', 'R@')}" if metric else direction
    out[key] = Published(float(value), source)
  return out


# MSCOCO 5k test, OSCAR base, k = 20. Table 1 (only its R@1 was recovered) and, for Joint+Coop,
# image retrieval R@5/R@10 from the authors' release. Keys: (config key, method).
COCO5K = {
    ("ce", "CE"): _cells(TABLE_1, t2i_R1=52.6, i2t_R1=69.3),
    ("be", "BE"): _cells(TABLE_1, t2i_R1=52.2, i2t_R1=66.9),
    ("separate", "RR"): _cells(TABLE_1, t2i_R1=52.8, i2t_R1=70.2),  # Sep+Coop
    ("joint", "BE"): _cells(TABLE_1, t2i_R1=52.5, i2t_R1=66.7),  # Joint+BE
    ("joint", "RR"): {**_cells(TABLE_1, t2i_R1=54.7, i2t_R1=70.8),  # Joint+Coop
                      **_cells(RELEASE, t2i_R5=81.3, t2i_R10=88.9)},
}

# Flickr30k 1k test, Joint+Coop image retrieval: the authors' release (R@1 also in Table 9's
# "CE alone" row). No other Flickr30k cell was recovered.
FLICKR30K = {
    ("joint", "RR"): _cells(RELEASE, t2i_R1=76.4, t2i_R5=93.6, t2i_R10=96.2),
}

# Multi30k test_2016, M3P Joint+Coop, mR per query language: the authors' release (cs is
# printed there without a decimal; it does not say BE or RR, so `reproduce` shows it on RR).
MULTI30K_MR = {
    "en": Published(83.0, RELEASE),
    "de": Published(79.2, RELEASE),
    "fr": Published(75.9, RELEASE),
    "cs": Published(74.0, RELEASE),
}

# Table 8: rerank depth k, Joint+Coop on MSCOCO 5k. k -> cells (k = 100 not in the table).
COCO5K_BY_K = {
    10: _cells(TABLE_8, t2i_R1=54.8, i2t_R1=70.9),
    20: _cells(TABLE_8, t2i_R1=54.7, i2t_R1=70.8),
    50: _cells(TABLE_8, t2i_R1=54.6, i2t_R1=70.7),
}

# Table 9: the BE cosine added to the CE score at rerank time, Joint+Coop on Flickr30k, image
# retrieval R@1. (fusion, weight w) -> cells; "combination" is the authors'
# (1 - w) * CE + w * cosine (their `scoring_factor` = w, the paper's lambda).
FLICKR30K_BY_FUSION = {
    ("standard", 0.0): _cells(TABLE_9, t2i_R1=76.4),  # CE alone
    ("combination", 0.1): _cells(TABLE_9, t2i_R1=76.7),
    ("combination", 0.9): _cells(TABLE_9, t2i_R1=74.6),
}

# Tables 3 and 4 (seconds), method -> Published. BE = bi-encoder retrieval; RR = the paper's
# "Coop" (BE top k reranked by the CE); CE = the cross-encoder over every pair.
LATENCY_50K = {  # Table 3: one text query against 50k images
    "BE": Published(0.016, TABLE_3),
    "RR": Published(0.074, TABLE_3),
    "CE": Published(120.0, TABLE_3),  # "2 min"
}
EVAL_COCO5K = {  # Table 4: all 25,000 captions x 5,000 images of MSCOCO 5k test, both directions
    "BE": Published(30.0, TABLE_4),  # "30 s"
    "RR": Published(25 * 60.0, TABLE_4),  # "25 min"
    "CE": Published(50 * 3600.0, TABLE_4),  # "50 h"
}
