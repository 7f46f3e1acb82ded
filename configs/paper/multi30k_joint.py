r"""Paper row: Multi30k, M3P base, Joint: one set of weights, alternating BE and CE updates,
lr 5e-5, 30k steps; trained on the captions of all four languages, evaluated per language.

Tables: multi30k (python -m rerank.reproduce --list). Evaluation: test_2016, one query language
at a time (`:lang=en|de|fr|cs`, which also filters training captions: train without it, then
evaluate with it; docs/REPRODUCE.md); methods BE, RR.
Hyperparameters: the authors' joint settings of shared/DESIGN.md section 2 (batch 128, 50
regions, AdamW eps 1e-6, wd 0.05, no warmup, clip 1.0, VSE++ margin 0.1, seed 123456789, bf16);
text up to 128 pieces (M3P). DESIGN records no M3P-specific lr or step count: assumed Joint's.

Needs: data/tfds/multi30k (python -m rerank.data.prepare --dataset=multi30k from the Multi30k
task 1/2 text files and image_splits, with the Flickr30k bottom-up TSV via --features=GLOB) and
checkpoints/m3p-base (python -m rerank.convert --family=m3p with --tokenizer=an xlm-roberta-base
directory). Other places: `:data_dir=DIR,init_from=DIR` after the config path.

Single GPU:
  python -m rerank.train --config=configs/paper/multi30k_joint.py --workdir=workdirs/multi30k_joint
TPU VM slice (workdir on storage every host sees):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run python -m rerank.train \
      --config=configs/paper/multi30k_joint.py --workdir=/shared/workdirs/multi30k_joint
Per language (after training):
  python -m rerank.evaluate --config=configs/paper/multi30k_joint.py:lang=de \
      --workdir=workdirs/multi30k_joint
Smoke run (synthetic_scenes, tiny model, 2 steps):
  python -m rerank.train --config=configs/paper/multi30k_joint.py:runlocal \
      --workdir=/tmp/multi30k_joint

Reference: mR per language, authors' README (Joint model): en 83.0, de 79.2, fr 75.9, cs 74.
"""

from rerank import paper_configs


def get_config(arg=None):
  return paper_configs.paper_config("multi30k", "joint", arg)
