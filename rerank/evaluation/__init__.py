"""Evaluation: BE / CE / RR recall tables over a split, a fold mean or an enlarged corpus
(`evaluator`), the metrics (`metrics`), results files, the sibling report (`siblings`), and
the paper's tables and published numbers as data (`paper_tables`, `paper_numbers`, read by
`rerank.reproduce`), and its cost tables measured on this device (`paper_costs`, run by
`rerank.bench`).
Models run through `rerank.inference.engine` (a `DataScorer` over a dataset's rows).

May import `rerank.inference`, `rerank.indexing`, `rerank.models` and `rerank.data`; never
training's loop or an entry point.
"""
