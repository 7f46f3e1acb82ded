r"""Paper row: Flickr30k, OSCAR base, Joint: one set of weights, alternating BE and CE updates, lr
5e-5, 30k steps (60k updates); evaluated BE and RR (k=20).

Tables: flickr30k, flickr30k_k, flickr30k_enlarged, zeroshot_flickr30k_to_coco
(python -m rerank.reproduce --list). Evaluation: test (1,000 images / 5,000
captions); methods BE, RR.
Hyperparameters: shared/DESIGN.md section 2 (batch 128, text 70+2, 50 regions, AdamW eps 1e-6,
wd 0.05, no warmup, linear decay, clip 1.0, VSE++ margin 0.1, seed 123456789, bf16).

Needs: data/tfds/flickr30k_butd (python -m rerank.data.prepare --dataset=flickr30k_butd from
the bottom-up-attention Flickr30k features (TSV) and flickr30k_entities Sentences + split lists) and
checkpoints/oscar-base-ir (python -m rerank.convert on OSCAR's base image-retrieval checkpoint).
Other places: `:data_dir=DIR,init_from=DIR` after the config path.

Single GPU:
  python -m rerank.train --config=configs/paper/flickr30k_joint.py \
      --workdir=workdirs/flickr30k_joint
TPU VM slice (workdir on storage every host sees):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run python -m rerank.train \
      --config=configs/paper/flickr30k_joint.py --workdir=/shared/workdirs/flickr30k_joint
Smoke run (synthetic_scenes, tiny model, 2 steps):
  python -m rerank.train --config=configs/paper/flickr30k_joint.py:runlocal \
      --workdir=/tmp/flickr30k_joint

Reference: t2i R@1/5/10: BE 71.6/91.5/95.0, RR 76.4/93.6/96.2 (authors' README).
"""

from rerank import paper_configs


def get_config(arg=None):
  return paper_configs.paper_config("flickr30k", "joint", arg)
