"""Readers for the authors' dataset releases, one module per source format (see `common`).

Each module has SPLITS (names, in order), DEV_SPLIT (the split used for model selection),
`check_files(source_dir, splits)` and `read(...)` yielding `common.Image`s of one split.
"""

from rerank.data.sources import cc_dev
from rerank.data.sources import coco_oscar
from rerank.data.sources import flickr30k_butd
from rerank.data.sources import multi30k
from rerank.data.sources import synthetic

SOURCES = {"coco_oscar": coco_oscar, "flickr30k_butd": flickr30k_butd, "multi30k": multi30k,
           "cc_dev": cc_dev, "synthetic_scenes": synthetic}
