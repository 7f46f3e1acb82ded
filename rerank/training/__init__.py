"""Training: losses, the jitted update step (`steps`), config validation (`validate`), the mesh
and parameter layouts (`sharding`), orbax checkpoints, multi-host start-up (`distributed`),
BE-mined hard negatives (`mining`) and metric logs.

Owns everything under the loop of `rerank.train.train_and_evaluate`. May import
`rerank.models`, `rerank.data` and `rerank.indexing`; never inference, evaluation or an entry
point.
"""
