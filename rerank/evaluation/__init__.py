"""Evaluation: BE / CE / RR recall tables, results files, the paper's tables.

May import `rerank.inference`, `rerank.indexing`, `rerank.models` and `rerank.data`; never
training's loop or an entry point.
"""
