r"""Paper row: MSCOCO, OSCAR base, Joint + ANCE hard negatives.

Needs: data/tfds/coco_oscar (python -m rerank.data.prepare --dataset=coco_oscar from OSCAR's
coco_ir release: {train,minival,test}_img_keys.tsv, test_img_keys_1k.tsv, *_captions.pt,
*_img_frcnn_feats.pt) and checkpoints/oscar-base-ir (python -m rerank.convert on OSCAR's
base image-retrieval checkpoint).

Evaluation: test (5k images) by default; `:split=test1k` (the authors' single 1k fold)
or `:split=test@5x1k` (mean of five 1k folds).
Data and weights elsewhere: `:data_dir=DIR,init_from=DIR` after the config path.

Single GPU:
  python -m rerank.train --config=configs/paper/coco_joint_ance.py \
      --workdir=workdirs/coco_joint_ance
TPU VM slice (workdir on storage every host sees):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run python -m rerank.train \
      --config=configs/paper/coco_joint_ance.py --workdir=/mnt/runs/coco_joint_ance
Smoke run (synthetic_scenes, tiny model, 2 steps):
  python -m rerank.train --config=configs/paper/coco_joint_ance.py:runlocal \
      --workdir=/tmp/coco_joint_ance
"""

from configs.paper import common


def get_config(arg=None):
  c, arg = common.base(arg, dataset="coco")
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
