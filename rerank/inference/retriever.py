"""Python API in the spirit of sentence-transformers: load once, then encode, predict, search.

  from rerank.models import build

  from rerank.retriever import Retriever
  r = Retriever.load("indexes/test")            # built by python -m rerank.index
  hits = r.search(["a red metal cube left of a ball"], k=20, rerank=True)
  hits[0][0]  # {"rank": 1, "row": ..., "image_id": ..., "be_score": ..., "ce_score": ..., ...}

The index directory records the checkpoint (training workdir) whose bi-encoder embedded the
corpus and a fingerprint of its parameters; loading refuses a checkpoint whose parameters or
embedding size differ. The corpus is the image side of a dataset split; its region features
are regenerated from the dataset (they feed the cross-encoder when reranking).
"""

import dataclasses
import functools
import hashlib
import json
import os
import types

import jax
import ml_collections
import numpy as np

from rerank.training import checkpoints
from rerank.evaluation import evaluator
from rerank.indexing import indexes as index_lib
from rerank.inference import reranker as rerank_lib
from rerank.training import steps
from rerank.data import datasets
from rerank.models import build
from rerank.models import heads
from rerank.models import modes


def params_fingerprint(params) -> str:
  """A short hash of every parameter's path, shape and bytes: equal iff the weights are equal."""
  h = hashlib.blake2b(digest_size=8)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    arr = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class Model:
  """A trained model restored from a training workdir."""

  config: ml_collections.ConfigDict
  tokenizer: object
  model: heads.RetrievalModel
  params: dict
  which: str  # e.g. "best (step 400)"
  workdir: str

  @functools.cached_property
  def fingerprint(self) -> str:
    return params_fingerprint(self.params)


def load_model(workdir: str, prefer_best: bool = True) -> Model:
  """The config (DIR/config.json) and best (else newest) parameters of a training workdir."""
  workdir = os.path.abspath(workdir)
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: not found; --checkpoint must be a training workdir "
                            "(python -m rerank.train ... --workdir=DIR)")
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = datasets.get_tokenizer(config)
  cls_id = tokenizer.token_to_id("[CLS]")  # None for XLM-R: build_model uses init_from's
  model = build.build_model(config, cls_id if cls_id is not None else 0, tokenizer.get_vocab_size())
  abstract = jax.eval_shape(functools.partial(
      steps.init_train_state, model, config, steps.optimizer(config)), jax.random.PRNGKey(0))
  ckpts = checkpoints.Checkpoints(workdir, keep=config.get("keep_checkpoints", 2))
  try:
    params, which = ckpts.restore_params(abstract, prefer_best=prefer_best)
  finally:
    ckpts.close()
  if params is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint in checkpoints/ or best/; train first")
  return Model(config, tokenizer, model, params, which, workdir)


def _search_cfg(config):
  defaults = dict(k=20, fusion="ce", alpha=0.5, query_block=8)
  defaults.update(config.get("search", {}) or {})
  return types.SimpleNamespace(**defaults)


class Retriever:
  """BE retrieval over an index of a corpus' images, optionally reranked by the CE."""

  def __init__(self, loaded: Model, corpus, captions, idx, meta: dict):
    self.m, self.corpus, self.captions, self.index, self.meta = loaded, corpus, captions, idx, meta
    cfg = loaded.config
    self.scorer = evaluator.Scorer(loaded.model, cfg.mode, cfg.eval.batch_size, loaded.params)
    self.search_cfg = _search_cfg(cfg)
    self._rerankers = {}
    # The first caption of each image, to show what an image is (features are not viewable).
    first = {}
    for t, row in enumerate(corpus.caption_image):
      first.setdefault(int(row), t)
    self.describe = [captions[first[i]] if i in first else "" for i in range(corpus.num_images)]

  @classmethod
  def load(cls, index_dir: str, checkpoint_dir: str | None = None) -> "Retriever":
    """The index in `index_dir` and the model it was built with (or `checkpoint_dir`, checked)."""
    identity = index_lib.read_meta(index_dir).get("identity", {})
    loaded = load_model(checkpoint_dir or identity.get("checkpoint", ""))
    dim = loaded.config.model.hidden_size
    idx, meta, _ = index_lib.load(index_dir, expect={"fingerprint": loaded.fingerprint, "dim": dim})
    config = loaded.config
    config.dataset.name = identity["dataset"]
    corpus, captions = datasets.load_split(config, identity["split"], loaded.tokenizer,
                                           identity.get("num_images") or None)
    if corpus.num_images != idx.size:
      raise index_lib.IndexMismatchError(
          f"{index_dir}: index holds {idx.size} items but {identity['dataset']}/{identity['split']} "
          f"now has {corpus.num_images} images; rebuild it with python -m rerank.index")
    return cls(loaded, corpus, captions, idx, meta)

  # ---------------------------------------------------------------- the three verbs

  def _tokenize(self, texts):
    if isinstance(texts, str):
      texts = [texts]
    for i, t in enumerate(texts):
      if not isinstance(t, str) or not t.strip():
        raise ValueError(f"query {i}: expected a non-empty string; found {t!r}")
    ids, mask = datasets.tokenize(self.m.tokenizer, list(texts), self.m.config.max_text_len)
    return types.SimpleNamespace(token_ids=ids, text_mask=mask)

  def encode_texts(self, texts) -> np.ndarray:
    """[N, H] unit BE embeddings of a list of strings."""
    toks = self._tokenize(texts)
    return self.scorer.texts(toks, np.arange(len(toks.token_ids)))

  def encode_images(self, rows) -> np.ndarray:
    """[N, H] unit BE embeddings of corpus images (by row)."""
    return self.scorer.images(self.corpus, np.asarray(rows))

  def predict(self, texts, rows) -> np.ndarray:
    """[N] CE match logits of pairs (texts[i], corpus image rows[i])."""
    toks = self._tokenize(texts)
    rows = np.asarray(rows)
    if len(rows) != len(toks.token_ids):
      raise ValueError(f"predict: {len(toks.token_ids)} texts but {len(rows)} image rows")
    merged = dataclasses.replace(self.corpus, token_ids=toks.token_ids, text_mask=toks.text_mask,
                                 caption_image=np.zeros(len(rows), np.int32))
    return self.scorer.pairs(merged, np.arange(len(rows)), rows)

  def search(self, queries, k: int | None = None, rerank: bool = True) -> list[list[dict]]:
    """Per query, the top-k corpus images, best first (reranked by the CE when `rerank`).

    k larger than the corpus is clamped to the corpus size.
    """
    k = k or self.search_cfg.k
    toks = self._tokenize(queries)
    q_emb = self.scorer.texts(toks, np.arange(len(toks.token_ids)))
    be_ids, be_scores = self.index.search(q_emb, k)  # [Q, k]
    res = {"ids": be_ids, "be": be_scores, "ce": np.full(be_ids.shape, np.nan),
           "score": be_scores}
    if rerank:
      if not modes.get(self.m.config.mode).has_ce:
        raise ValueError(f"rerank: the checkpoint's mode {self.m.config.mode!r} has no cross-encoder")
      res = self._reranker(be_ids.shape[1])(
          self.scorer.ce_params, functools.partial(self._pairs, toks), be_ids, be_scores)
    image_ids = self.corpus.image_ids
    return [[{"rank": j + 1, "row": int(r), "image_id": int(image_ids[r]),
              "be_score": float(res["be"][q, j]), "ce_score": float(res["ce"][q, j]),
              "score": float(res["score"][q, j]), "caption": self.describe[int(r)]}
             for j, r in enumerate(res["ids"][q]) if r >= 0] for q in range(len(be_ids))]

  # ---------------------------------------------------------------- rerank plumbing

  def _reranker(self, k: int) -> rerank_lib.Reranker:
    if k not in self._rerankers:  # one jitted function per k; its shapes never change after
      s = self.search_cfg
      self._rerankers[k] = rerank_lib.Reranker(self.m.model, k, s.query_block, s.fusion, s.alpha)
    return self._rerankers[k]

  def _pairs(self, toks, rows, cand):
    """[B] query rows x [B, k] image rows -> the pair arrays, each [B, k, ...]."""
    b, k = cand.shape
    tok = np.repeat(toks.token_ids[rows][:, None], k, axis=1)
    mask = np.repeat(toks.text_mask[rows][:, None], k, axis=1)
    regions, region_mask = self.corpus.region_features(cand.reshape(-1))
    return (tok, mask, regions.reshape((b, k) + regions.shape[1:]),
            region_mask.reshape(b, k, -1))
