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

An index of a folder of photos (`python -m rerank.index --images=PHOTOS`, a pixel model:
a converted checkpoint or a training workdir) gives hits with "file" (the path relative to
PHOTOS, as stored in the index) and "path" (absolute, under PHOTOS or the `images_dir` given
to `load`, for a folder that moved) instead of an image id and caption. Reranking reads the k
candidates from their files again, or, for a BLIP index, takes their cached image states
(rerank/inference/image_cache.py; `load(..., use_image_cache=False)` reads the files instead).
"""

import os

import numpy as np

from rerank import errors
from rerank.data import datasets
from rerank.data import image_folder
from rerank.data import images as images_lib
from rerank.indexing import indexes as index_lib
from rerank.inference import engine as engine_lib
from rerank.inference import image_cache
from rerank.inference import reranker as rerank_lib

_SEARCH_DEFAULTS = dict(fusion="ce", alpha=0.5, fusion_weight=0.0, query_block=8)
_CONVERTED_K = 20  # search's default k with a converted checkpoint (no config.eval.k)


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

  def __init__(self, restored: engine_lib.Restored, corpus, captions, idx, meta: dict,
               image_states=None):
    self.m, self.corpus, self.captions, self.index, self.meta = restored, corpus, captions, idx, meta
    self.image_states = image_states  # [N, P+1, Dv] (a memmap) of a BLIP folder index, else None
    self.folder = isinstance(corpus, image_folder.ImageFolder)
    cfg = restored.config  # None for a converted checkpoint: the defaults below
    self.engine = restored.engine(cfg.eval.batch_size if cfg is not None else 32)  # unit embeddings
    search = (cfg.get("search", {}) if cfg is not None else {}) or {}
    # k has one home, config.eval.k; an old workdir's search.k is ignored.
    self.k = cfg.eval.k if cfg is not None else _CONVERTED_K
    self.fusion, self.alpha, self.fusion_weight, self.query_block = (
        search.get(name, default) for name, default in _SEARCH_DEFAULTS.items())
    self._rerankers = {}
    if self.folder:
      self.describe = list(corpus.files)
      return
    # The first caption of each image, to show what an image is (features are not viewable).
    first = {}
    for t, row in enumerate(corpus.caption_image):
      first.setdefault(int(row), t)
    self.describe = [captions[first[i]] if i in first else "" for i in range(corpus.num_images)]

  @classmethod
  def load(cls, index_dir: str, checkpoint_dir: str | None = None, images_dir: str | None = None,
           use_image_cache: bool = True) -> "Retriever":
    """The index in `index_dir` and the model it was built with (or `checkpoint_dir`, checked).

    A folder index reads its photos under `images_dir` (default: the folder it was built
    from) and, with `use_image_cache`, reranks from its cached image states when it has them.
    """
    identity = index_lib.read_meta(index_dir).get("identity", {})
    if "images" in identity:
      return cls._load_folder(index_dir, identity, checkpoint_dir, images_dir, use_image_cache)
    if images_dir is not None:
      raise errors.expected("images_dir", "an index of a folder of photos (rerank.index "
                            "--images)", f"{index_dir}, an index of a dataset split")
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

  @classmethod
  def _load_folder(cls, index_dir, identity, checkpoint_dir, images_dir, use_image_cache):
    meta_file = os.path.join(index_dir, "index.json")
    if not isinstance(identity.get("checkpoint"), str) or not isinstance(identity["images"], str):
      raise index_lib.IndexFormatError(f"{meta_file}: identity: expected the checkpoint and "
                                       "images folder that python -m rerank.index records")
    restored = engine_lib.restore(checkpoint_dir or identity["checkpoint"])
    if restored.image is None:
      raise index_lib.IndexMismatchError(f"{index_dir}: an index of photos, but "
                                         f"{restored.path} is not a pixel-family model")
    dim = engine_lib.embed_dim(restored.model)
    idx, meta, arrays = index_lib.load(index_dir, expect={"fingerprint": restored.fingerprint,
                                                          "dim": dim},
                                       mmap_arrays=("image_states",))
    files = arrays.get("image_files")
    if files is None or files.dtype.kind != "U" or files.shape != (idx.size,):
      raise index_lib.IndexFormatError(
          f"{index_dir}/image_files.npy: expected {idx.size} file names; found "
          f"{'none' if files is None else f'{files.dtype} {list(files.shape)}'}")
    states = arrays.get("image_states") if use_image_cache else None
    if states is not None and (states.ndim != 3 or len(states) != idx.size
                               or not image_cache.supports(restored.model)):
      raise index_lib.IndexFormatError(
          f"{index_dir}/image_states.npy: expected [{idx.size}, P+1, Dv] image states of a model "
          f"that reranks from them; found {list(states.shape)} for {restored.description}")
    spec = images_lib.ImageSpec.from_dict(restored.image, where=f"{restored.path}: image")
    root = os.path.abspath(images_dir or identity["images"])
    if not os.path.isdir(root):
      raise errors.expected(f"{'images_dir' if images_dir else meta_file + ': images'} {root!r}",
                            "the folder of photos the index was built from (moved? pass its "
                            "new place)", "no directory there")
    corpus = image_folder.ImageFolder(root, files.tolist(), spec)
    return cls(restored, corpus, None, idx, meta, states)

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
    return [[dict(rank=j + 1, row=int(r), **self._what(int(r)), be_score=float(res["be"][q, j]),
                  ce_score=float(res["ce"][q, j]), score=float(res["score"][q, j]))
             for j, r in enumerate(res["ids"][q]) if r >= 0] for q in range(len(be_ids))]

  def _what(self, row: int) -> dict:
    """What a hit is: its file ("file" relative to the photo folder, "path" absolute) in a
    folder index, else its image id and first caption."""
    if self.folder:
      return {"file": self.corpus.files[row], "path": self.corpus.path(row)}
    return {"image_id": int(self.corpus.image_ids[row]), "caption": self.describe[row]}

  # ---------------------------------------------------------------- rerank plumbing

  def _reranker(self, k: int) -> rerank_lib.Reranker:
    if k not in self._rerankers:  # one jitted function per k; its shapes never change after
      self._rerankers[k] = rerank_lib.Reranker(self.m.model, k, self.query_block, self.fusion,
                                               self.alpha, self.fusion_weight,
                                               from_states=self.image_states is not None)
    return self._rerankers[k]

  def _pairs(self, token_ids, text_mask, rows, cand):
    """[B] query rows x [B, k] image rows -> the pair arrays, each [B, k, ...]."""
    b, k = cand.shape
    tok = np.repeat(token_ids[rows][:, None], k, axis=1)
    mask = np.repeat(text_mask[rows][:, None], k, axis=1)
    if self.image_states is not None:  # cached: [B * k, P+1, Dv]; no image mask to pass
      uniq = np.unique(cand)  # sorted: one read of each candidate from the memmap
      states = np.asarray(self.image_states[uniq], np.float32)[np.searchsorted(uniq, cand.reshape(-1))]
      return tok, mask, states.reshape((b, k) + states.shape[1:]), np.zeros((b, k, 0), bool)
    regions, region_mask = self.corpus.region_features(cand.reshape(-1))
    return (tok, mask, regions.reshape((b, k) + regions.shape[1:]),
            region_mask.reshape((b, k) + region_mask.shape[1:]))
