r"""The pixel demo: a tiny ViLT-style (or BLIP-style) model on synthetic_scenes rendered as images.

The same scenes, captions and BE / CE / RR evaluation as configs/demo.py, but the model reads
pixels: each scene is drawn as a 48 x 48 RGB image (`synthetic_scenes.render`: shape, colour,
material and size of every object in its box) and preprocessed as the family's image processor
does (`config.image`, rerank/data/images.py). No pretrained weights exist for a model this
small, so it trains from random weights, jointly (alternating BE and CE updates), on a CPU in
minutes.

  python -m rerank.train --config=configs/demo_pixels.py --workdir=workdirs/demo_pixels
  python -m rerank.train --config=configs/demo_pixels.py:family=blip --workdir=workdirs/demo_pixels_blip
  python -m rerank.train --config=configs/demo_pixels.py:runlocal --workdir=/tmp/demo_pixels_local

Arguments (after the colon, comma separated): `family=vilt|blip` the model (ViLT: one
Transformer over text and image patches; BLIP: a ViT, a text encoder with cross-attention, ITC
and ITM heads); `runlocal` shrinks everything to a smoke run of seconds (tests use it);
`mode=NAME` the objective (be, ce, joint_alternate, joint_sum, separate); `sharding=dp|fsdp|tp`
the parameter layout. Any field: `--config.FIELD=VALUE`.
"""

import ml_collections

from configs import common
from rerank.data import images
from rerank.training import sharding

IMAGE_SIZE = 48  # rendered side, in pixels: 6 x 6 patches of 8
PATCH = 8


def _vilt(hidden, layers, heads, mlp, text_len):
  """config.model and config.image of a ViLT-style model on IMAGE_SIZE x IMAGE_SIZE images."""
  model = dict(family="vilt", hidden_size=hidden, num_layers=layers, num_heads=heads,
               mlp_dim=mlp, max_position_embeddings=text_len, image_size=IMAGE_SIZE,
               patch_size=PATCH, max_image_height=IMAGE_SIZE, max_image_width=IMAGE_SIZE,
               pooling="mean", dropout_rate=0.0, attention_dropout_rate=0.0, dtype="float32",
               remat=False, head_dropout=0.1)
  # ViLT's resize-the-shorter-side rule with the longer side capped at the same size: square
  # renders stay as drawn, on a canvas of exactly IMAGE_SIZE (no padding to spend patches on).
  image = dict(kind="vilt", size=IMAGE_SIZE, max_size=IMAGE_SIZE, size_divisor=PATCH,
               mean=list(images.VILT_MEAN), std=list(images.VILT_STD), resample="bicubic")
  return model, image


def _blip(hidden, layers, heads, mlp, text_len):
  """config.model and config.image of a BLIP-style model: both towers of the same size."""
  model = dict(family="blip", hidden_size=hidden, num_layers=layers, num_heads=heads,
               mlp_dim=mlp, max_position_embeddings=text_len, vision_hidden_size=hidden,
               vision_num_layers=layers, vision_num_heads=heads, vision_mlp_dim=mlp,
               image_size=IMAGE_SIZE, patch_size=PATCH, image_text_hidden_size=hidden // 2,
               dropout_rate=0.0, attention_dropout_rate=0.0, dtype="float32", remat=False,
               head_dropout=0.1)
  image = dict(kind="blip", size=IMAGE_SIZE, mean=list(images.CLIP_MEAN),
               std=list(images.CLIP_STD), resample="bicubic")
  return model, image


FAMILIES = {"vilt": _vilt, "blip": _blip}


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, family="vilt", mode="joint_alternate",
                         sharding="dp")
  if arg.family not in FAMILIES:
    raise ValueError(f"config argument family: expected one of {sorted(FAMILIES)}; "
                     f"found {arg.family!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = arg.mode

  # image_size: rendered side (0 = config.image.size).
  c.dataset = dict(name="synthetic_scenes", seed=0, family_size=4, noise_std=1.0,
                   min_objects=2, max_objects=4, image_size=IMAGE_SIZE,
                   # 500 steps of 64 see 32k captions: 8,000 images (40k captions) are
                   # plenty and generate in a quarter of the full split's time.
                   num_train_images=8000, num_dev_images=200, num_test_images=0,  # 0 = full
                   data_dir="", tokenizer="", language="")
  c.max_text_len = 32  # sampled captions have at most 30 words and marks, + [CLS] and [SEP]
  c.max_regions = 4  # unused by pixel families; kept so the region tools read the config

  # No dropout in the encoder (as configs/demo.py from scratch); the CE head keeps 0.1.
  c.model, c.image = FAMILIES[arg.family](128, 2, 4, 256, c.max_text_len)
  c.init_from = ""

  c.batch_size = 64
  c.total_steps = 500
  c.lr = 1e-3
  c.warmup_steps = 50
  c.weight_decay = 0.05
  c.adam_eps = 1e-6
  c.clip_norm = 1.0
  # As configs/demo.py from random weights: InfoNCE (VSE++'s hardest negative collapses from
  # scratch) and the authors' pairwise CE loss.
  c.loss = dict(be="infonce", margin=0.1, temperature=0.05, ce_weight=1.0, ce="pairwise",
                ce_group=dict(captions=16, size=8, confusers=3))
  c.hard_negatives = dict(every=0, start=0, top=50, ce_prob=0.0, confuser_prob=0.0, index="",
                          temperature=0.0, be_negatives=0)

  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  # No dev evaluation: from random weights in this budget the last step is the best, and a dev
  # round (CE pairs of rendered images) costs a minute on a busy 2-core CPU.
  c.eval_every = 0

  c.mesh = dict(data=-1, model=1)
  if arg.sharding not in sharding.RULES:
    raise ValueError(f"config argument sharding: expected one of {sorted(sharding.RULES)}; "
                     f"found {arg.sharding!r}")
  c.rules = dict(sharding.RULES[arg.sharding])
  c.grad_accum = 1

  # As configs/demo.py (see there), on seeded query samples: a CE pair (text + 37 image
  # tokens, rendered and preprocessed) costs more than a region one, so the CE alone is scored
  # for 30 text and 6 image queries against the whole test split, RR for 1,000 and 200.
  c.eval = dict(split="test", k=20, batch_size=256, ce_queries_t2i=30, ce_queries_i2t=6,
                rr_queries_t2i=1000, rr_queries_i2t=200, use_best=False, index="exact",
                fusion="standard", fusion_weight=0.0,
                dev_ce_queries_t2i=20, dev_ce_queries_i2t=10, part_pairs=1 << 17)
  c.index = dict(backend="auto", exact_max=20_000, num_leaves=0, leaves_to_search=0, reorder=0,
                 dims_per_block=0, aq_threshold=0.0, training_sample=0, target_recall=0.95,
                 recall_k=20, calibration_queries=1000)
  c.search = dict(fusion="ce", alpha=0.5, query_block=8)

  if arg.runlocal:
    c.dataset.num_train_images = 64
    c.dataset.num_dev_images = 16
    c.dataset.num_test_images = 32
    c.model, c.image = FAMILIES[arg.family](32, 1, 2, 64, c.max_text_len)
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
    c.eval.rr_queries_t2i = 0
    c.eval.rr_queries_i2t = 0
    c.eval.dev_ce_queries_t2i = -1
    c.eval.dev_ce_queries_i2t = -1
  return c
