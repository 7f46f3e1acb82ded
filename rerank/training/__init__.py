"""Training: losses, the jitted update step, sharding, checkpoints, multi-host start-up, logging.

Owns everything `python -m rerank.train` needs below its loop. May import `rerank.models`,
`rerank.data` and `rerank.indexing`; never inference, evaluation or an entry point.
"""
