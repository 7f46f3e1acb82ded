"""Nearest-neighbour indexes over embedding arrays (exact, ScaNN, JAX top-k, sharded) and
rankings with a defined tie-break. Knows nothing of models: arrays in, ids and scores out.

Imports nothing else of `rerank`.
"""
