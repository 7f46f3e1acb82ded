r"""Paper row: Flickr30k, OSCAR base, CE only (cross-encoder).

Needs: data/tfds/flickr30k_butd (python -m rerank.data.prepare --dataset=flickr30k_butd
from the bottom-up-attention Flickr30k features (TSV) and flickr30k_entities Sentences +
split lists) and checkpoints/oscar-base-ir (python -m rerank.convert on OSCAR's base
image-retrieval checkpoint).

Evaluation: test (1,000 images / 5,000 captions).
Data and weights elsewhere: `:data_dir=DIR,init_from=DIR` after the config path.

Single GPU:
  python -m rerank.train --config=configs/paper/flickr30k_ce.py --workdir=workdirs/flickr30k_ce
TPU VM slice (workdir on storage every host sees):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run python -m rerank.train \
      --config=configs/paper/flickr30k_ce.py --workdir=/mnt/runs/flickr30k_ce
Smoke run (synthetic_scenes, tiny model, 2 steps):
  python -m rerank.train --config=configs/paper/flickr30k_ce.py:runlocal --workdir=/tmp/flickr30k_ce
"""

from configs.paper import common


def get_config(arg=None):
  c, arg = common.base(arg, dataset="flickr30k")
  c.mode = "ce"
  c.lr = 5e-5
  c.total_steps = 100_000
  c.batch_size = 128  # captions per step (CE: 256 pairs)
  c.eval.k = 20  # rerank depth: RR reranks the BE top k with the CE
  c.loss.be = "vsepp"  # VSE++: hardest in-batch negative (margin in common)
  c.loss.ce = "pairwise"  # the authors' 2-class loss on one positive and one negative pair
  return common.finish(c, arg)
