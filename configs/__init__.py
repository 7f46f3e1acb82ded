"""Experiment configs: `get_config(arg)` per file, loaded by `--config=configs/FILE.py[:ARG]`.

A package so configs share settings by ordinary imports (`from configs import common`,
`from configs.paper import common`). Configs sit above the library: they may import `rerank`,
and nothing in `rerank` imports them.
"""
