r"""Paper row (Table 9): Flickr30k, OSCAR base, Joint, RR ranked by the CE score alone.

Not a training run of its own: the training settings are flickr30k_joint.py's, and this config
re-evaluates that workdir with another rerank score. Needs what flickr30k_joint.py needs:
data/tfds/flickr30k_butd (python -m rerank.data.prepare --dataset=flickr30k_butd) and
checkpoints/oscar-base-ir (python -m rerank.convert), then a trained workdir.

Evaluation: test (1,000 images / 5,000 captions), RR with the BE top 20.
Data and weights elsewhere: `:data_dir=DIR,init_from=DIR` after the config path.

Single GPU (train once with flickr30k_joint.py, then evaluate each fusion row):
  python -m rerank.train --config=configs/paper/flickr30k_joint.py \
      --workdir=workdirs/flickr30k_joint
  python -m rerank.evaluate --config=configs/paper/flickr30k_fusion_standard.py \
      --workdir=workdirs/flickr30k_joint --out=results/flickr30k_joint.fusion_standard
TPU VM slice (workdir on storage every host sees):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run python -m rerank.evaluate \
      --config=configs/paper/flickr30k_fusion_standard.py --workdir=/mnt/runs/flickr30k_joint \
      --out=/mnt/runs/flickr30k_joint.fusion_standard
Smoke run (synthetic_scenes, tiny model, 2 steps):
  python -m rerank.train --config=configs/paper/flickr30k_fusion_standard.py:runlocal \
      --workdir=/tmp/flickr30k_fusion_standard
"""

from configs.paper import flickr30k_joint


def get_config(arg=None):
  c = flickr30k_joint.get_config(arg)
  c.eval.fusion = "standard"  # RR ranks the BE top k by the CE score alone
  c.eval.fusion_weight = 0.0  # unused by "standard"
  return c
