"""Inference: restore a trained or converted model (`engine.restore`), jitted BE encoders and
CE pair scoring over arrays with fixed shapes (`engine.Engine`), the jitted rerank
(`reranker`), and the `Retriever` Python API (`from rerank.inference import Retriever`).

May import `rerank.models`, `rerank.data`, `rerank.indexing` and `rerank.training` (checkpoint
layout, abstract train state); never evaluation or an entry point.
"""

from rerank.inference.retriever import Retriever

__all__ = ["Retriever"]
