"""Data: the dataset registry and tokenisation, model-ready splits (`batches.RetrievalData`),
training batches as a pure function of (seed, step), evaluation sets (fold means, enlarged
corpora), the built-in `synthetic_scenes` generator, and conversion of the authors' releases
into TFDS datasets (`prepare`, an entry point, and its readers under `sources/`).

Imports nothing else of `rerank`.
"""
