"""rerank: fast retrieval and smart reranking for image-text search in JAX/Flax.

Library code lives in sub-packages, each owning one concern and importing only the layers
below it (docs/DESIGN.md, section 4; tests/test_layout.py enforces it):

  models      Flax modules, training modes, model construction, converted checkpoints
  data        datasets, tokenisation, training batches, evaluation sets, TFDS preparation
  indexing    nearest-neighbour indexes over arrays, rankings with a defined tie-break
  training    losses, the update step, sharding, checkpoints, multi-host start-up, mining
  inference   restoring a model, jitted BE encoders / CE scoring / rerank, `Retriever`
  evaluation  BE / CE / RR recall tables, results files, the paper's tables

The top-level modules are commands (`python -m rerank.train`, `rerank.evaluate`, ...): thin
shells over those libraries, following the flag convention of `rerank.cli`.
"""
