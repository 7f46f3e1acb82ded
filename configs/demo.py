r"""The main job: a small JOINT bi-/cross-encoder on the built-in synthetic_scenes dataset.

Like the paper, it fine-tunes a pretrained vision-language encoder: `pretrained/synthetic_mini`
(in the repository), which `pretrain` below made from random weights on ANOTHER generated world
(dataset seed 1; the demo trains and tests on seed 0). It trains one set of weights with both
objectives (alternating updates, as the authors), then evaluates the bi-encoder (BE), the
cross-encoder (CE, on a seeded sample of queries) and retrieve-and-rerank (RR, BE top-20
reranked by CE) on the 1,000-image test split.

  python -m rerank.train --config=configs/demo.py --workdir=workdirs/demo
  python -m rerank.train --config=configs/demo.py:runlocal --workdir=/tmp/demo_local
  # The pretrained checkpoint, again (about 55 minutes on a 2-core CPU):
  python -m rerank.train --config=configs/demo.py:pretrain --workdir=workdirs/pretrain
  python -m rerank.export --workdir=workdirs/pretrain --dst=DIR --which=last

Arguments (after the colon, comma separated): `runlocal` shrinks everything to a smoke run
of seconds from random weights (tests use it); `scratch` trains the demo from random weights
(no pretrained checkpoint); `pretrain` is the run that made the checkpoint; `size=NAME` picks
the encoder size (any size but mini starts from random weights); `mode=NAME` the objective
(be, ce, joint_alternate, joint_sum, separate); `sharding=dp|fsdp|tp` the parameter layout
(see rerank/training/sharding.py). Any field: `--config.FIELD=VALUE`.
"""

import os

import ml_collections

from configs import common
from rerank.training import sharding

# Made by `pretrain` (20,000 steps) and `python -m rerank.export --which=last`.
PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "pretrained", "synthetic_mini")


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, size="mini", mode="joint_alternate",
                         sharding="dp", scratch=False, pretrain=False)
  from_scratch = arg.runlocal or arg.scratch or arg.pretrain or arg.size != "mini"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = arg.mode

  c.dataset = dict(name="synthetic_scenes", seed=1 if arg.pretrain else 0, family_size=4, noise_std=1.0,
                   min_objects=2, max_objects=4,
                   num_train_images=0, num_dev_images=200, num_test_images=0,  # 0 = full split
                   # A prepared TFDS dataset (python -m rerank.data.prepare) instead of the
                   # generated one; tokenizer: vocab.txt / tokenizer.json for real captions;
                   # language: keep only captions in it (Multi30k). Empty = unused.
                   data_dir="", tokenizer="", language="")
  c.max_text_len = 40
  c.max_regions = 4  # == dataset.max_objects

  # From scratch, a LayerNorm on the region embeddings (as M3P/UNITER have; OSCAR only when its
  # config asks) puts regions on the text embeddings' scale: without it a CE trained alone stays
  # at loss log(2) for 400+ steps here, with it it learns within 200. No dropout in the encoder:
  # 1,600 steps over 145k captions do not overfit, and dropout costs ~25% of a CPU step. The
  # CE head keeps the authors' dropout (model.head_dropout = 0.1), which costs next to nothing.
  scratch = dict(visual_layernorm=True, dropout_rate=0.0, attention_dropout_rate=0.0)
  c.model = common.model_config(arg.size, **scratch)
  # A converted checkpoint (rerank.convert / rerank.export) to start from: architecture,
  # tokenizer and encoder weights come from it, the CE head starts fresh.
  c.init_from = "" if from_scratch else PRETRAINED

  c.batch_size = 64
  c.total_steps = 20_000 if arg.pretrain else 1600
  c.lr = 1e-3 if from_scratch else 2e-4
  c.warmup_steps = 100
  c.weight_decay = 0.05
  c.adam_eps = 1e-6
  c.clip_norm = 1.0
  # From random init, VSE++'s hardest negative collapses (loss stuck at 2 * margin, seen here);
  # the paper's VSE++ starts from pretrained weights. InfoNCE trains from scratch.
  # CE loss: "pairwise" = the authors' 2-class loss on (1 positive, 1 negative) per caption;
  # "listwise" = softmax over a group: the caption's image, `confusers` of its known confusers
  # and random other images, `size` in all, for the first `captions` captions of each step.
  c.loss = dict(be="infonce", margin=0.1, temperature=0.05, ce_weight=1.0, ce="pairwise",
                ce_group=dict(captions=16, size=8, confusers=3))
  # ANCE-style: every `every` steps from `start`, the current BE mines its `top` neighbours
  # of each upcoming caption; the CE takes one as its negative with probability `ce_prob`.
  # `confuser_prob`: else the CE negative is one of the dataset's known confusers of the
  # caption's image (synthetic_scenes: its family siblings, of which every caption is false).
  # index: "" mines by chunked brute force; exact|scann|jax|auto mine through rerank.index and
  # draw negatives with p ~ softmax(cosine / temperature) (temperature 0 = uniform over top).
  # `be_negatives`: per caption, that many mined images feed a sampled-triplet BE loss (margin
  # loss.margin) added to the in-batch one (the authors' ANCE runs use 7; random images before
  # the first mining).
  # Pretraining and the demo give the CE a sibling for half of its negatives: from random
  # weights the binding of attributes to objects appears only after ~10k such steps (the
  # `pretrain` run's CE tells a caption's image from a colour/material-swapped sibling 52% of
  # the time at step 4k, 60% at 8k, 88% at 12k); `scratch` uses the authors' random negatives.
  c.hard_negatives = dict(every=0, start=0, top=50, ce_prob=0.0,
                          confuser_prob=0.0 if arg.scratch or arg.runlocal else 0.5, index="",
                          temperature=0.0, be_negatives=0)

  c.log_every = 200 if arg.pretrain else 50
  c.checkpoint_every = 1000 if arg.pretrain else 500
  c.keep_checkpoints = 2
  c.eval_every = 2000 if arg.pretrain else 400  # dev evaluation (BE mR), best checkpoint; 0 = off

  # Scale-out (README "Running at scale"). Mesh axes in order, -1 = the devices the others
  # leave; rules map each logical parameter/batch axis to the mesh axes it may use, the first
  # that applies wins ("" = replicated; "data,model" = data, else model). "dp" keeps every
  # parameter whole on every device; "fsdp" and "tp" differ from it in the rules only.
  # Rematerialisation is `model.remat`; bf16 compute (float32 master weights) `model.dtype`.
  c.mesh = dict(data=-1, model=1)
  if arg.sharding not in sharding.RULES:
    raise ValueError(f"config argument sharding: expected one of {sorted(sharding.RULES)}; "
                     f"found {arg.sharding!r}")
  c.rules = dict(sharding.RULES[arg.sharding])
  c.grad_accum = 1  # micro-batches per update (changes in-batch-negative losses; see steps.py)

  # eval.k: the rerank depth (BE top k reranked by the CE), for evaluation and for search;
  # exactly k candidates, also below 10 (the authors' evaluator reranks max(k, 10)).
  # eval.fusion: RR's order inside the top k, "standard" (the CE alone), "combination"
  # ((1 - w) * CE + w * cosine), "combination_normalized" (both min-max normalised per query
  # first) or "rank" (mixing the two ranks); w = eval.fusion_weight (the paper's Table 9).
  # eval.index: the BE first stage, "exact" (brute force), "scann", "jax" (on-device top-k)
  # or "auto" (exact up to index.exact_max items, else ScaNN).
  # eval.dev_ce_queries_*: the CE query sample of the dev evaluation during training (-1 = as
  # ce_queries_*). eval.part_pairs: CE pairs per stored part of the final evaluation, which
  # a preempted run resumes from (rerank/evaluation/parts.py).
  c.eval = dict(split="test", k=20, batch_size=256, ce_queries_t2i=100, ce_queries_i2t=50,
                rr_queries_t2i=0, rr_queries_i2t=0, use_best=True, index="exact",
                fusion="standard", fusion_weight=0.0,  # 0 = all queries
                dev_ce_queries_t2i=-1, dev_ce_queries_i2t=-1, part_pairs=1 << 17)
  if arg.pretrain:
    c.eval.update(ce_queries_t2i=30, ce_queries_i2t=6)
  # Index built by `python -m rerank.index` (and used by evaluation when eval.index != exact).
  # ScaNN fields at 0 are chosen from the corpus size (rerank/indexing/indexes.py: scann_params).
  # target_recall: the leaves to search are the fewest whose recall@recall_k against exact search
  # reaches it on calibration_queries held-out queries, measured at build time and kept in the
  # index metadata (rerank/indexing/calibrate.py); a leaves_to_search > 0 fixes the count instead.
  c.index = dict(backend="auto", exact_max=20_000, num_leaves=0, leaves_to_search=0, reorder=0,
                 dims_per_block=0, aq_threshold=0.0, training_sample=0, target_recall=0.95,
                 recall_k=20, calibration_queries=1000)
  # Search / Retriever: rerank the BE top eval.k (the one rerank depth) with the CE; fusion
  # "ce" (CE score alone, the authors' default) or "mix" (alpha * P_CE + (1 - alpha) * cosine).
  c.search = dict(fusion="ce", alpha=0.5, query_block=8)

  if arg.runlocal:
    c.dataset.num_train_images = 64
    c.dataset.num_dev_images = 16
    c.dataset.num_test_images = 32
    c.model = common.model_config("tiny", **scratch)
    c.batch_size = 8
    c.total_steps = 6
    c.warmup_steps = 1
    c.log_every = 2
    c.checkpoint_every = 3
    c.eval_every = 3
    c.eval.k = 5
    c.eval.batch_size = 32
    c.eval.ce_queries_t2i = 8
    c.eval.ce_queries_i2t = 4
  return c
