"""Inference: restore a trained or converted model, jitted BE encoders and CE pair scoring with
fixed shapes, the jitted rerank, and the `Retriever` Python API.

May import `rerank.models`, `rerank.data`, `rerank.indexing` and `rerank.training` (checkpoint
layout); never evaluation or an entry point.
"""
