"""Evaluation sets beyond a plain split: COCO 1k as 5 folds, and enlarged (distractor) corpora.

- COCO 1k: the authors evaluate ONE fold, OSCAR's `test_img_keys_1k.tsv` (prepared as the
  split `test1k`); the common convention elsewhere is the mean over the 5 consecutive folds
  of 1,000 images of the 5k test split (`folds` + `mean_rows`). Results name which.
- Enlarged test sets: the images and captions of other datasets join the corpus as
  distractors; the queries and the relevance come from the main dataset only (`enlarge`).
Spec strings for `load` (e.g. `config.eval.split`): `test1k` (a split), `test@5x1k` (fold
mean), `test+cc_dev:dev+coco_oscar:test` (main split + distractor dataset:split ...).
`rerank.evaluation.evaluator.evaluate_config` evaluates a spec and reports its protocol.
"""

import dataclasses

import numpy as np

from rerank.data import batches


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One corpus to evaluate on, and which of its rows are queries (None = all)."""

  name: str                # what results.json's "split" says
  data: batches.RetrievalData
  query_texts: np.ndarray | None = None
  query_images: np.ndarray | None = None


def subset(data: batches.RetrievalData, image_rows: np.ndarray) -> batches.RetrievalData:
  """The given images with all their captions, rows renumbered in the given order."""
  image_rows = np.asarray(image_rows, np.int64)
  new_row = np.full(data.num_images, -1, np.int64)
  new_row[image_rows] = np.arange(len(image_rows))
  texts = np.flatnonzero(new_row[data.caption_image] >= 0)
  return batches.RetrievalData(
      token_ids=data.token_ids[texts], text_mask=data.text_mask[texts],
      caption_image=new_row[data.caption_image[texts]].astype(np.int32),
      image_ids=data.image_ids[image_rows],
      region_features=lambda rows: data.region_features(image_rows[np.asarray(rows)]))


def folds(data: batches.RetrievalData, num_folds: int = 5, fold_size: int = 1000):
  """Consecutive folds of `fold_size` images (COCO 5k -> five 1k folds), in stored order."""
  if data.num_images < num_folds * fold_size:
    raise ValueError(f"{num_folds} folds of {fold_size} images need {num_folds * fold_size} "
                     f"images; the split has {data.num_images}")
  return [subset(data, np.arange(f * fold_size, (f + 1) * fold_size)) for f in range(num_folds)]


def mean_rows(rows_per_fold: list[list[dict]]) -> list[dict]:
  """Results rows averaged over folds (recalls, mR, RSUM, seconds); query counts summed."""
  out = []
  for rows in zip(*rows_per_fold):
    first = rows[0]
    row = dict(first)
    for key in ("t2i", "i2t"):
      row[key] = {k: float(np.mean([r[key][k] for r in rows])) for k in first[key]}
    for key, value in first.items():
      if isinstance(value, float) and key not in ("t2i", "i2t"):
        row[key] = float(np.mean([r[key] for r in rows]))
    row["queries"] = {k: int(sum(r["queries"][k] for r in rows)) for k in first["queries"]}
    row["folds"] = len(rows)
    out.append(row)
  return out


def enlarge(main: batches.RetrievalData, *distractors: batches.RetrievalData) -> EvalSet:
  """Main corpus + distractor images and captions; queries = the main rows only.

  Distractor image ids are made negative and distinct per dataset, so no distractor caption
  is ever relevant to a main image (relevance is by image id) nor the other way round.
  """
  parts = [main, *distractors]
  widths = {p.token_ids.shape[1] for p in parts}
  if len(widths) > 1:
    raise ValueError(f"token widths differ across datasets: {sorted(widths)}")
  image_offsets = np.cumsum([0] + [p.num_images for p in parts])
  ids = [main.image_ids] + [-(np.int64(k) << 40) - 1 - np.arange(p.num_images, dtype=np.int64)
                            for k, p in enumerate(distractors, 1)]

  def region_features(rows):
    rows = np.asarray(rows, np.int64)
    which = np.searchsorted(image_offsets, rows, side="right") - 1
    out = None
    for k in np.unique(which):
      sel = np.flatnonzero(which == k)
      regions, mask = parts[k].region_features(rows[sel] - image_offsets[k])
      if out is None:
        out = (np.zeros((len(rows),) + regions.shape[1:], regions.dtype),
               np.zeros((len(rows),) + mask.shape[1:], bool))
      out[0][sel], out[1][sel] = regions, mask
    return out

  data = batches.RetrievalData(
      token_ids=np.concatenate([p.token_ids for p in parts]),
      text_mask=np.concatenate([p.text_mask for p in parts]),
      caption_image=np.concatenate([p.caption_image + o for p, o in
                                    zip(parts, image_offsets)]).astype(np.int32),
      image_ids=np.concatenate(ids), region_features=region_features)
  return EvalSet(name="", data=data, query_texts=np.arange(main.num_texts),
                 query_images=np.arange(main.num_images))


def from_spec(config, spec: str, tokenizer, load_split, num_images=None) -> tuple[list[EvalSet], bool]:
  """Eval sets of a spec string (module docstring) -> (sets, whether to average them).

  `load_split(config, split, tokenizer, num_images)` is `datasets.load_split`; a distractor
  `name:split` is read with `config.dataset.name` replaced by `name` (same data_dir).
  """
  main_spec, *extra = spec.split("+")
  split, _, fold_spec = main_spec.partition("@")
  main, _ = load_split(config, split, tokenizer, num_images)
  if fold_spec:
    n, _, size = fold_spec.partition("x")
    size = int(size[:-1]) * 1000 if size.endswith("k") else int(size)
    return [EvalSet(f"{split} fold {f} of {n}", d) for f, d in
            enumerate(folds(main, int(n), size))], True
  if not extra:
    return [EvalSet(split, main)], False
  others = []
  for item in extra:
    name, _, dsplit = item.partition(":")
    other_cfg = config.copy_and_resolve_references()
    with other_cfg.unlocked():
      other_cfg.dataset.name = name
      other_cfg.dataset.language = ""
    others.append(load_split(other_cfg, dsplit or "test", tokenizer, None)[0])
  return [dataclasses.replace(enlarge(main, *others), name=spec)], False
