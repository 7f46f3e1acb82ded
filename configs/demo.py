r"""The main job: a small JOINT bi-/cross-encoder on the built-in synthetic_scenes dataset.

Trains one set of weights with both objectives (alternating updates, as the authors), then
evaluates the bi-encoder (BE), the cross-encoder (CE, on a seeded sample of queries) and
retrieve-and-rerank (RR, BE top-20 reranked by CE) on the 1,000-image test split.

  python -m rerank.train --config=configs/demo.py --workdir=workdirs/demo
  python -m rerank.train --config=configs/demo.py:runlocal --workdir=/tmp/demo_local

Arguments (after the colon, comma separated): `runlocal` shrinks everything to a smoke run
of seconds (tests use it); `size=NAME` picks the encoder size; `mode=NAME` the objective
(be, ce, joint_alternate, joint_sum, separate). Any field: `--config.FIELD=VALUE`.
"""

from rerank import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, runlocal=False, size="mini", mode="joint_alternate")
  c = config_utils.ml_collections.ConfigDict()
  c.seed = 0
  c.mode = arg.mode

  c.dataset = dict(name="synthetic_scenes", seed=0, family_size=4, noise_std=1.0,
                   min_objects=2, max_objects=4,
                   num_train_images=0, num_dev_images=200, num_test_images=0,  # 0 = full split
                   # A prepared TFDS dataset (python -m rerank.data.prepare) instead of the
                   # generated one; tokenizer: vocab.txt / tokenizer.json for real captions;
                   # language: keep only captions in it (Multi30k). Empty = unused.
                   data_dir="", tokenizer="", language="")
  c.max_text_len = 40
  c.max_regions = 4  # == dataset.max_objects

  c.model = config_utils.model_config(arg.size)
  c.init_from = ""  # a converted checkpoint directory to start from (later issue)

  c.batch_size = 64
  c.total_steps = 1600
  c.lr = 1e-3
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
  c.hard_negatives = dict(every=0, start=0, top=50, ce_prob=0.0, confuser_prob=0.0, index="",
                          temperature=0.0)

  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.eval_every = 400  # dev evaluation (BE mR) and best-checkpoint tracking; 0 = off

  # eval.index: the BE first stage, "exact" (brute force), "scann", "jax" (on-device top-k)
  # or "auto" (exact up to index.exact_max items, else ScaNN).
  c.eval = dict(split="test", k=20, batch_size=256, ce_queries_t2i=100, ce_queries_i2t=20,
                rr_queries_t2i=0, rr_queries_i2t=0, use_best=True, index="exact")  # 0 = all queries
  # Index built by `python -m rerank.index` (and used by evaluation when eval.index != exact).
  # ScaNN fields at 0 are chosen from the corpus size (rerank/index.py: scann_params).
  c.index = dict(backend="auto", exact_max=20_000, num_leaves=0, leaves_to_search=0, reorder=0,
                 dims_per_block=0, aq_threshold=0.0, training_sample=0)
  # Search / Retriever: rerank the BE top `k` with the CE; fusion "ce" (CE score alone, the
  # authors' default) or "mix" (alpha * P_CE + (1 - alpha) * cosine).
  c.search = dict(k=20, fusion="ce", alpha=0.5, query_block=8)

  if arg.runlocal:
    c.dataset.num_train_images = 64
    c.dataset.num_dev_images = 16
    c.dataset.num_test_images = 32
    c.model = config_utils.model_config("tiny")
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
