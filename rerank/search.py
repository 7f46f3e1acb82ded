r"""Searches an index built by `python -m rerank.index` and prints the ranked images.

  python -m rerank.search --index=DIR --query="a red metal cube" [--k=20] [--rerank] [--show=10]

Each line: rank, corpus row, image id, BE cosine, CE score (with --rerank), and the first
caption of the image (to see what it is). With --rerank the BE top-k is reordered by the CE
(or by the fusion of config.search.fusion). From Python: `rerank.inference.Retriever`.

An index of a folder of photos (python -m rerank.index --images=PHOTOS) prints each hit's
file path relative to PHOTOS instead of an image id and caption; --images says where PHOTOS
is now if it moved. Reranking reads the candidates' files again, or uses a BLIP index's cached
image states.
"""

from absl import flags

from rerank import cli
from rerank.indexing import indexes as index_lib
from rerank.inference import retriever

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("index", None, "Index directory (python -m rerank.index --out=DIR).")
  flags.DEFINE_multi_string("query", None, "Query text; repeat the flag for several.")
  flags.DEFINE_integer("k", None, "Candidates retrieved (and reranked); clamped to the corpus "
                       "size. Default: the checkpoint config's eval.k (20 in the demo).")
  flags.DEFINE_bool("rerank", False, "Rerank the top-k with the cross-encoder.")
  flags.DEFINE_integer("show", 10, "How many of the k to print per query.")
  flags.DEFINE_string("checkpoint", None, "Training workdir to use instead of the one recorded "
                      "in the index (must have the same parameters).")
  flags.DEFINE_string("images", None, "Index of a folder of photos: the folder to read them "
                      "from, if not where the index was built from (it moved).")


def main(argv):
  del argv
  cli.quiet_library_logs()
  if not FLAGS.index:
    cli.fail("--index is required (a directory written by python -m rerank.index)")
  queries = FLAGS.query or []
  if not queries or any(not q.strip() for q in queries):
    cli.fail(f"--query: expected a non-empty text; found {retriever.shorten(queries)}")
  if FLAGS.k is not None and FLAGS.k < 1:
    cli.fail(f"--k: expected >= 1; found {FLAGS.k}")
  if FLAGS.show < 1:
    cli.fail(f"--show: expected >= 1; found {FLAGS.show}")
  try:
    r = retriever.Retriever.load(FLAGS.index, FLAGS.checkpoint, FLAGS.images)
    results = r.search(queries, k=FLAGS.k, rerank=FLAGS.rerank)
  except (FileNotFoundError, index_lib.IndexMismatchError, ValueError) as e:
    cli.fail(str(e))
  for query, hits in zip(queries, results):
    print(f"\nquery: {retriever.shorten(query)}  ({len(hits)} of {r.index.size} images"
          f"{', CE reranked' if FLAGS.rerank else ''})")
    if r.folder:
      print(f"{'rank':>4} {'row':>6} {'BE cos':>7} {'CE':>8}  file")
    else:
      print(f"{'rank':>4} {'row':>6} {'image_id':>9} {'BE cos':>7} {'CE':>8}  caption")
    for h in hits[:FLAGS.show]:
      ce = f"{h['ce_score']:8.3f}" if FLAGS.rerank else f"{'-':>8}"
      if r.folder:
        print(f"{h['rank']:>4} {h['row']:>6} {h['be_score']:7.3f} {ce}  {h['file']}")
      else:
        print(f"{h['rank']:>4} {h['row']:>6} {h['image_id']:>9} {h['be_score']:7.3f} {ce}  "
              f"{h['caption']}")


if __name__ == "__main__":
  cli.run(main, define_flags)
