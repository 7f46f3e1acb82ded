"""A folder of photos as a corpus: its image files, decoded and preprocessed in batches.

What `python -m rerank.index --images=DIR` embeds, and what `rerank.search` reads again to
rerank (a pixel model's cross-encoder needs the candidates' pixels):

- `list_images(root)`: the image files under `root`, recursively, as sorted relative paths
  ("/"-separated), so the same folder always gives the same rows. Hidden files and folders
  (".name") are left out; extensions are matched case-insensitively.
- `batches(root, files, spec, batch_size)`: (rows, images, mask, bad) per batch of files,
  decoded by a few threads while the caller runs the model on the previous batch. A file that
  cannot be decoded (`images.BadImage`) is reported in `bad`, not raised.
- `ImageFolder`: rows of an index -> the model's image input, read from the files again.
"""

import collections
import concurrent.futures
import os

import numpy as np

from rerank import errors
from rerank.data import images as images_lib

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_PREFETCH = 2  # batches decoded ahead of the one the model is running on


def list_images(root: str, where: str = "--images") -> list[str]:
  """Relative paths ("/"-separated, sorted) of the image files under `root`.

  Raises errors.UserError naming `where` when `root` is not a directory.
  """
  if not os.path.isdir(root):
    raise errors.expected(f"{where} {root!r}", "a directory of images",
                          "a file" if os.path.exists(root) else "nothing there")
  out = []
  for dirpath, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for name in files:
      if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
        out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return sorted(out)


def _load(root: str, rel: str, spec: images_lib.ImageSpec):
  """(image [H, W, 3] float32, mask [H, W] bool) of one file, or the BadImage it raised."""
  try:
    im = images_lib.load_image(os.path.join(root, *rel.split("/")), name=rel)
  except images_lib.BadImage as e:
    return e
  pixels, mask = images_lib.preprocess([im], spec)
  return pixels[0], mask[0]


def batches(root: str, files: list[str], spec: images_lib.ImageSpec, batch_size: int,
            workers: int | None = None):
  """Yields (rows [b] int64, images [b, H, W, 3] float32, mask [b, H, W] bool, bad) per batch.

  `rows` index `files` (the readable ones of the batch, in order); `bad` is a list of
  (file, reason) for the others. Decoding and resizing run in `workers` threads (Pillow
  releases the GIL), up to _PREFETCH batches ahead; the order never depends on timing.
  """
  height, width = spec.canvas
  starts = list(range(0, len(files), batch_size))
  workers = workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    submit = lambda a: (a, [pool.submit(_load, root, f, spec) for f in files[a:a + batch_size]])  # noqa: E731
    pending = collections.deque(submit(a) for a in starts[:_PREFETCH])
    upcoming = iter(starts[_PREFETCH:])
    while pending:
      a, futures = pending.popleft()
      nxt = next(upcoming, None)
      if nxt is not None:
        pending.append(submit(nxt))
      results = [f.result() for f in futures]
      ok = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
      bad = [(files[a + i], r.reason) for i, r in enumerate(results) if isinstance(r, Exception)]
      pixels = np.zeros((len(ok), height, width, 3), np.float32)
      mask = np.zeros((len(ok), height, width), bool)
      for j, i in enumerate(ok):
        pixels[j], mask[j] = results[i]
      yield np.asarray([a + i for i in ok], np.int64), pixels, mask, bad


class ImageFolder:
  """The photos of an index as a corpus: row r is `files[r]` under `root`.

  `region_features(rows)` gives the model's image input like `RetrievalData.region_features`
  (the name is the pipeline's, for pixels too), decoding the files again.
  """

  def __init__(self, root: str, files, spec: images_lib.ImageSpec):
    self.root, self.files, self.spec = root, [str(f) for f in files], spec

  @property
  def num_images(self) -> int:
    return len(self.files)

  def path(self, row: int) -> str:
    """Absolute path of the file of row `row`."""
    return os.path.join(self.root, *self.files[row].split("/"))

  def region_features(self, rows) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, H, W, 3] float32, mask [n, H, W] bool) of index rows, read from the files.

    Raises errors.UserError when a file can no longer be read (it changed after indexing).
    """
    rows = np.asarray(rows, np.int64).reshape(-1)
    ims = []
    for r in rows:
      try:
        ims.append(images_lib.load_image(self.path(int(r)), name=self.path(int(r))))
      except images_lib.BadImage as e:
        raise errors.UserError(f"{e}; it was readable when the index was built: rebuild the "
                               "index with python -m rerank.index --images=...") from None
    return images_lib.preprocess(ims, self.spec)
