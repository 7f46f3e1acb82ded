r"""Paper row: MSCOCO, OSCAR base, CE only (cross-encoder, 2-class loss), lr 5e-5, 100k steps.

Tables: coco5k, coco1k, coco5x1k (python -m rerank.reproduce --list). Evaluation: test (5k) by
default; `:split=test1k` (authors' single 1k fold) or `:split=test@5x1k` (mean of five 1k
folds); methods CE.
Hyperparameters: shared/DESIGN.md section 2 (batch 128, text 70+2, 50 regions, AdamW eps 1e-6,
wd 0.05, no warmup, linear decay, clip 1.0, VSE++ margin 0.1, seed 123456789, bf16).

Needs: data/tfds/coco_oscar (python -m rerank.data.prepare --dataset=coco_oscar from
OSCAR's coco_ir release ({train,minival,test}_img_keys.tsv, test_img_keys_1k.tsv, *_captions.pt,
*_img_frcnn_feats.pt)) and
checkpoints/oscar-base-ir (python -m rerank.convert on OSCAR's base image-retrieval checkpoint).
Other places: `:data_dir=DIR,init_from=DIR` after the config path.

Single GPU:
  python -m rerank.train --config=configs/paper/coco_ce.py --workdir=workdirs/coco_ce
TPU VM slice (workdir on storage every host sees):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run python -m rerank.train \
      --config=configs/paper/coco_ce.py --workdir=/shared/workdirs/coco_ce
Smoke run (synthetic_scenes, tiny model, 2 steps):
  python -m rerank.train --config=configs/paper/coco_ce.py:runlocal --workdir=/tmp/coco_ce

Reference: none published in the authors' README for this row (the paper's own table
cells are not transcribed here yet).
"""

from rerank import paper_configs


def get_config(arg=None):
  return paper_configs.paper_config("coco", "ce", arg)
