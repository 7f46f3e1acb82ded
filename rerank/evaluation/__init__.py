"""Evaluation: BE / CE / RR recall tables over a split, a fold mean or an enlarged corpus
(`evaluator`), the metrics (`metrics`), results files, the sibling report (`siblings`), and
the paper's tables as data (`paper_tables`, read by `rerank.reproduce`).
Models run through `rerank.inference.engine` (a `DataScorer` over a dataset's rows).

May import `rerank.inference`, `rerank.indexing`, `rerank.models` and `rerank.data`; never
training's loop or an entry point.
"""
