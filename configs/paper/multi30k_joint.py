r"""Paper row: Multi30k, M3P base, Joint (one set of weights, alternating BE and CE updates).

Needs: data/tfds/multi30k (python -m rerank.data.prepare --dataset=multi30k from the
Multi30k task 1/2 text files and image_splits, with the Flickr30k bottom-up TSV via
--features=GLOB) and checkpoints/m3p-base (python -m rerank.convert --family=m3p with
--tokenizer=an xlm-roberta-base directory).

Evaluation: test_2016, one query language at a time (`:lang=en|de|fr|cs`, which also
filters training captions: train without it, then evaluate with it; docs/REPRODUCE.md).
Data and weights elsewhere: `:data_dir=DIR,init_from=DIR` after the config path.

Single GPU:
  python -m rerank.train --config=configs/paper/multi30k_joint.py --workdir=workdirs/multi30k_joint
TPU VM slice (workdir on storage every host sees):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run python -m rerank.train \
      --config=configs/paper/multi30k_joint.py --workdir=/mnt/runs/multi30k_joint
Per language (after training):
  python -m rerank.evaluate --config=configs/paper/multi30k_joint.py:lang=de \
      --workdir=workdirs/multi30k_joint
Smoke run (synthetic_scenes, tiny model, 2 steps):
  python -m rerank.train --config=configs/paper/multi30k_joint.py:runlocal \
      --workdir=/tmp/multi30k_joint
"""

from configs.paper import common


def get_config(arg=None):
  c, arg = common.base(arg, dataset="multi30k")
  c.mode = "joint_alternate"
  c.lr = 5e-5  # no M3P-specific lr or step count published: Joint's
  c.total_steps = 30_000  # 60k updates: a BE then a CE update per step
  c.batch_size = 128  # captions per step (CE: 256 pairs)
  c.eval.k = 20  # rerank depth: RR reranks the BE top k with the CE
  c.loss.be = "vsepp"  # VSE++: hardest in-batch negative (margin in common)
  c.loss.ce = "pairwise"  # the authors' 2-class loss on one positive and one negative pair
  return common.finish(c, arg)
