r"""Paper row: Flickr30k, OSCAR base, Joint + ANCE hard negatives.

Needs: data/tfds/flickr30k_butd (python -m rerank.data.prepare --dataset=flickr30k_butd
from the bottom-up-attention Flickr30k features (TSV) and flickr30k_entities Sentences +
split lists) and checkpoints/oscar-base-ir (python -m rerank.convert on OSCAR's base
image-retrieval checkpoint).

Evaluation: test (1,000 images / 5,000 captions).
Data and weights elsewhere: `:data_dir=DIR,init_from=DIR` after the config path.

Single GPU:
  python -m rerank.train --config=configs/paper/flickr30k_joint_ance.py \
      --workdir=workdirs/flickr30k_joint_ance
TPU VM slice (workdir on storage every host sees):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run python -m rerank.train \
      --config=configs/paper/flickr30k_joint_ance.py --workdir=/mnt/runs/flickr30k_joint_ance
Smoke run (synthetic_scenes, tiny model, 2 steps):
  python -m rerank.train --config=configs/paper/flickr30k_joint_ance.py:runlocal \
      --workdir=/tmp/flickr30k_joint_ance
"""

from configs.paper import common


def get_config(arg=None):
  c, arg = common.base(arg, dataset="flickr30k")
  c.mode = "joint_alternate"
  c.lr = 2e-5
  c.total_steps = 15_000  # 15 epochs x 1k steps
  c.batch_size = 128  # captions per step (CE: 256 pairs)
  c.eval.k = 20  # rerank depth: RR reranks the BE top k with the CE
  c.loss.be = "vsepp"  # VSE++: hardest in-batch negative (margin in common)
  c.loss.ce = "pairwise"  # the authors' 2-class loss on one positive and one negative pair
  # ANCE: every 1k-step epoch the current BE mines its top 50 images per caption; 7 of them
  # feed a BE triplet loss, and the CE takes one as its negative with probability 0.05.
  c.hard_negatives.update(every=1000, start=0, top=50, ce_prob=0.05, be_negatives=7)
  return common.finish(c, arg)
