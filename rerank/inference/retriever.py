"""Python API in the spirit of sentence-transformers: load once, then encode, predict, search.

  from rerank.inference import Retriever

  r = Retriever.load("indexes/test")            # built by python -m rerank.index
  hits = r.search(["a red metal cube left of a ball"], k=20, rerank=True)
  hits[0][0]  # {"rank": 1, "row": ..., "image_id": ..., "be_score": ..., "ce_score": ..., ...}

The index directory records the checkpoint (training workdir) whose bi-encoder embedded the
corpus and a fingerprint of its parameters; loading refuses a checkpoint whose parameters or
embedding size differ. The corpus is the image side of a dataset split; its region features
are regenerated from the dataset (they feed the cross-encoder when reranking). Search's k
defaults to the checkpoint config's `eval.k`; `config.search` holds the rerank fusion.
"""

import numpy as np

from rerank import errors
from rerank.data import datasets
from rerank.indexing import indexes as index_lib
from rerank.inference import engine as engine_lib
from rerank.inference import reranker as rerank_lib

_SEARCH_DEFAULTS = dict(fusion="ce", alpha=0.5, fusion_weight=0.0, query_block=8)


def shorten(value, limit: int = 80) -> str:
  """repr(value) for a message, cut to about `limit` characters: a query can be a book.

  A string longer than `limit` shows its first `limit` characters and its length.
  """
  if isinstance(value, str):
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
  text = repr(value)
  return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters of repr)"


def _check_image_ids(index_dir: str, identity: dict, saved, now) -> None:
  """Row r of the index must still be image r of the split (it may have been re-prepared)."""
  if saved is None:
    return
  saved, now = np.asarray(saved), np.asarray(now)
  if saved.shape != now.shape or not np.array_equal(saved, now):
    row = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
    raise index_lib.IndexMismatchError(
        f"{index_dir}: image_ids.npy differs from {identity.get('dataset')}/{identity.get('split')} "
        f"from row {row} on (the split was re-prepared?); rebuild it with python -m rerank.index")


class Retriever:
  """BE retrieval over an index of a corpus' images, optionally reranked by the CE."""

  def __init__(self, restored: engine_lib.Restored, corpus, captions, idx, meta: dict):
    self.m, self.corpus, self.captions, self.index, self.meta = restored, corpus, captions, idx, meta
    cfg = restored.config
    self.engine = restored.engine(cfg.eval.batch_size)  # unit embeddings, as evaluation's
    search = cfg.get("search", {}) or {}
    # k has one home, config.eval.k; an old workdir's search.k is ignored.
    self.k = cfg.eval.k
    self.fusion, self.alpha, self.fusion_weight, self.query_block = (
        search.get(name, default) for name, default in _SEARCH_DEFAULTS.items())
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
    absent = [key for key in ("checkpoint", "dataset", "split") if not isinstance(identity.get(key), str)]
    if absent:
      raise index_lib.IndexFormatError(
          f"{index_dir}/index.json: identity: expected the checkpoint, dataset and split that "
          f"python -m rerank.index records; found no {', '.join(absent)}")
    restored = engine_lib.restore_workdir(checkpoint_dir or identity.get("checkpoint", ""))
    dim = engine_lib.embed_dim(restored.model)
    idx, meta, arrays = index_lib.load(index_dir, expect={"fingerprint": restored.fingerprint, "dim": dim})
    config = restored.config
    config.dataset.name = identity["dataset"]
    corpus, captions = datasets.load_split(config, identity["split"], restored.tokenizer,
                                           identity.get("num_images") or None)
    if corpus.num_images != idx.size:
      raise index_lib.IndexMismatchError(
          f"{index_dir}: index holds {idx.size} items but {identity['dataset']}/{identity['split']} "
          f"now has {corpus.num_images} images; rebuild it with python -m rerank.index")
    _check_image_ids(index_dir, identity, arrays.get("image_ids"), corpus.image_ids)
    return cls(restored, corpus, captions, idx, meta)

  # ---------------------------------------------------------------- the three verbs

  def _tokenize(self, texts):
    """(token ids [N, L], mask [N, L]) of a string or a non-empty list of non-empty strings."""
    if isinstance(texts, str):
      texts = [texts]
    if isinstance(texts, np.ndarray):
      texts = texts.tolist()
    if not isinstance(texts, (list, tuple)) or not texts:
      raise errors.UserError(f"queries: expected a string or a non-empty list of strings; "
                             f"found {shorten(texts)}")
    for i, t in enumerate(texts):
      if not isinstance(t, str) or not t.strip():
        raise errors.UserError(f"query {i}: expected a non-empty string; found {shorten(t)}")
    return self.m.text_inputs(texts)

  def _rows(self, rows) -> np.ndarray:
    """[N] int64 corpus rows, each in [0, num_images): -1 is an error, not the last image."""
    arr = np.asarray(rows)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
      raise errors.UserError(f"rows: expected a list of integer corpus rows; found "
                             f"{shorten(rows)}")
    n = self.corpus.num_images
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
      raise errors.UserError(f"rows: expected corpus rows in [0, {n}); found {int(bad[0])}")
    return arr.astype(np.int64)

  def encode_texts(self, texts) -> np.ndarray:
    """[N, H] unit BE embeddings of a list of strings."""
    return self.engine.embed_texts(*self._tokenize(texts))

  def encode_images(self, rows) -> np.ndarray:
    """[N, H] unit BE embeddings of corpus images (by row)."""
    return self.engine.embed_images(*engine_lib.image_rows(self.corpus, self._rows(rows)))

  def predict(self, texts, rows) -> np.ndarray:
    """[N] CE match logits of pairs (texts[i], corpus image rows[i])."""
    ids, mask = self._tokenize(texts)
    rows = self._rows(rows)
    if len(rows) != len(ids):
      raise ValueError(f"predict: {len(ids)} texts but {len(rows)} image rows")
    return self.engine.score_pairs(ids, mask, *engine_lib.image_rows(self.corpus, rows))

  def search(self, queries, k: int | None = None, rerank: bool = True) -> list[list[dict]]:
    """Per query, the top-k corpus images, best first (reranked by the CE when `rerank`).

    k defaults to the checkpoint config's eval.k; k larger than the corpus is clamped to the
    corpus size; k < 1 is an error.
    """
    if k is None:
      k = self.k
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
      raise errors.UserError(f"k: expected an integer >= 1; found {shorten(k)}")
    ids, mask = self._tokenize(queries)
    q_emb = self.engine.embed_texts(ids, mask)
    be_ids, be_scores = self.index.search(q_emb, k)  # [Q, k]
    res = {"ids": be_ids, "be": be_scores, "ce": np.full(be_ids.shape, np.nan),
           "score": be_scores}
    if rerank:
      if not self.m.mode.has_ce:
        raise ValueError(f"rerank: the checkpoint's mode {self.m.mode.name!r} has no cross-encoder")
      pairs = lambda rows, cand: self._pairs(ids, mask, rows, cand)  # noqa: E731
      res = self._reranker(be_ids.shape[1])(self.engine.ce_params, pairs, be_ids, be_scores)
    image_ids = self.corpus.image_ids
    return [[{"rank": j + 1, "row": int(r), "image_id": int(image_ids[r]),
              "be_score": float(res["be"][q, j]), "ce_score": float(res["ce"][q, j]),
              "score": float(res["score"][q, j]), "caption": self.describe[int(r)]}
             for j, r in enumerate(res["ids"][q]) if r >= 0] for q in range(len(be_ids))]

  # ---------------------------------------------------------------- rerank plumbing

  def _reranker(self, k: int) -> rerank_lib.Reranker:
    if k not in self._rerankers:  # one jitted function per k; its shapes never change after
      self._rerankers[k] = rerank_lib.Reranker(self.m.model, k, self.query_block, self.fusion,
                                               self.alpha, self.fusion_weight)
    return self._rerankers[k]

  def _pairs(self, token_ids, text_mask, rows, cand):
    """[B] query rows x [B, k] image rows -> the pair arrays, each [B, k, ...]."""
    b, k = cand.shape
    tok = np.repeat(token_ids[rows][:, None], k, axis=1)
    mask = np.repeat(text_mask[rows][:, None], k, axis=1)
    regions, region_mask = self.corpus.region_features(cand.reshape(-1))
    return (tok, mask, regions.reshape((b, k) + regions.shape[1:]),
            region_mask.reshape(b, k, -1))
