"""Models: the single-stream encoder, its BE and CE heads, the training modes, model
construction from a config, and converted pretrained checkpoints (reading PyTorch weights per
family, writing and reading our own layout).

Imports nothing else of `rerank`.
"""
