r"""`python -m rerank.reproduce`: the paper's tables from trained workdirs, beside its numbers.

  python -m rerank.reproduce --list
  python -m rerank.reproduce --table=flickr30k \
      --workdirs=be=workdirs/flickr30k_be,joint=workdirs/flickr30k_joint [--out=tables/flickr30k]

`--workdirs` maps a row's key (be, ce, separate, joint, joint_ance; k10, ...; en, ...) to a
workdir holding results.json, or to a results JSON file (COCO 1k and 5k come from one trained
workdir evaluated twice; see docs/REPRODUCE.md). Rows without a run, or whose run lacks the
method, are printed as "missing". Every metric column has a reference column (the published
value) and a delta column (ours minus it); `ref source` names the paper table or the authors'
release each published value comes from, and a cell with no published value says "missing".
With `--out=PREFIX`, PREFIX.md and PREFIX.csv are written atomically; without it the markdown
goes to stdout. The tables (rows, configs) are data in rerank/evaluation/paper_tables.py, the
published values in rerank/evaluation/paper_numbers.py.
"""

import csv
import io
import json
import os

from absl import flags

from rerank import cli
from rerank.evaluation import paper_numbers
from rerank.evaluation import paper_tables

FLAGS = flags.FLAGS
METRICS = [("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10"),
           ("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10")]
# Each metric, then its published value and our difference from it.
CELLS = [f"{d} {k}" for d, k in METRICS] + ["mR"]
COLUMNS = (["row", "method"] + [c for cell in CELLS for c in (cell, f"{cell} ref", f"{cell} delta")]
           + ["s/query", "ref source", "split", "source"])


def define_flags():
  flags.DEFINE_bool("list", False, "Print the tables and their rows, then exit.")
  flags.DEFINE_string("table", None, f"Table to build: one of {sorted(paper_tables.TABLES)}.")
  flags.DEFINE_list("workdirs", [], "KEY=PATH pairs: row config key -> workdir or results JSON.")
  flags.DEFINE_string("out", None, "Write PREFIX.md and PREFIX.csv instead of printing.")


def table_split(table: str) -> str:
  """The evaluation split a table's runs must report (from its rows' config arguments)."""
  row = paper_tables.TABLES[table][1][0]
  if row.eval_split:
    return row.eval_split
  config = row.config
  _, _, arg = config.partition(":split=")
  return arg or paper_tables.DATASETS[os.path.basename(config).split("_")[0]][1]


def load_run(path: str) -> dict:
  """results.json of a workdir, or a results JSON file; errors name the file and the problem."""
  file = os.path.join(path, "results.json") if os.path.isdir(path) else path
  try:
    with open(file) as f:
      results = json.load(f)
  except OSError as e:
    raise ValueError(f"{file}: cannot read ({e.strerror or e})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
    raise ValueError(f"{file}: expected a results.json object with a 'rows' list")
  results["_source"] = file
  return results


def collect(table: str, runs: dict[str, dict]) -> list[dict]:
  """One dict per table row: the metrics of its method from its run, or None where missing."""
  if table not in paper_tables.TABLES:
    raise ValueError(f"--table: expected one of {sorted(paper_tables.TABLES)}; found {table!r}")
  rows = paper_tables.TABLES[table][1]
  keys = {r.key for r in rows}
  unknown = sorted(set(runs) - keys)
  if unknown:
    raise ValueError(f"--workdirs: unknown row key(s) {unknown}; expected some of {sorted(keys)}")
  split = table_split(table)
  dataset = (rows[0].eval_dataset
             or paper_tables.DATASETS[os.path.basename(rows[0].config).split("_")[0]][0])
  for key, results in runs.items():
    if results.get("dataset") != dataset:
      raise ValueError(f"--workdirs {key}: {results['_source']} is a run on dataset "
                       f"{results.get('dataset')!r}; table {table} needs {dataset!r}")
    if results.get("split") != split:
      raise ValueError(f"--workdirs {key}: {results['_source']} was evaluated on split "
                       f"{results.get('split')!r}; table {table} needs {split!r} "
                       f"(python -m rerank.evaluate ... --config.eval.split={split})")
  out = []
  for row in rows:
    results = runs.get(row.key)
    found = None
    if results is not None:
      found = next((r for r in results["rows"] if r.get("method") == row.method), None)
      if row.language and results.get("language") != row.language:
        raise ValueError(f"--workdirs {row.key}: {results['_source']} has queries in "
                         f"language {results.get('language')!r}; row needs {row.language!r} "
                         f"(rerank.evaluate ... --config.dataset.language={row.language})")
      if found is not None and row.k is not None and found.get("k") != row.k:
        raise ValueError(f"--workdirs {row.key}: {results['_source']} reranked "
                         f"k={found.get('k')}; row needs k={row.k} "
                         f"(python -m rerank.evaluate ... --config.eval.k={row.k})")
      if found is not None and row.fusion is not None and run_fusion(found) != row.fusion:
        raise ValueError(f"--workdirs {row.key}: {results['_source']} fused scores as "
                         f"{run_fusion(found)}; row needs {row.fusion} "
                         f"(python -m rerank.evaluate --config={row.config} ...)")
    out.append({"row": row, "metrics": found,
                "split": results.get("split") if results else None,
                "source": results["_source"] if results else None})
  return out


def run_fusion(row: dict) -> tuple[str, float]:
  """(mode, weight) a results.json RR row was reranked with (its "fusion": {"mode", "weight"});
  a row without one predates fusion modes, so the CE alone ("standard", whose weight is unused)."""
  fusion = row.get("fusion") or {}
  mode = fusion.get("mode", "standard")
  if mode in ("standard", "ce"):
    return "standard", 0.0
  return mode, float(fusion.get("weight", 0.0))


def _fmt(x, spec=".1f"):
  return "missing" if x is None else format(x, spec)


def _value(metrics: dict | None, cell: str) -> float | None:
  """Our value of a CELLS entry ("t2i R@1", "mR") in a results.json row, or None."""
  if metrics is None:
    return None
  if cell == "mR":
    return metrics["mR"]
  direction, k = cell.split()
  return metrics[direction][k]


def reference_sources(row: paper_tables.Row) -> str:
  """"paper Table 1 (t2i R@1, i2t R@1); ..." for a row's published cells, or "missing"."""
  by_source = {}
  for cell, ref in row.reference.items():
    by_source.setdefault(ref.source, []).append(cell)
  return "; ".join(f"{src} ({', '.join(cells)})" for src, cells in by_source.items()) or "missing"


def render(table: str, collected: list[dict]) -> tuple[str, str]:
  """(markdown, csv) of a collected table; missing numbers are the word "missing"."""
  lines, used = [], set()
  for entry in collected:
    row, m = entry["row"], entry["metrics"]
    cells = []
    for cell in CELLS:
      ours, ref = _value(m, cell), row.reference.get(cell)
      delta = ours - ref.value if ours is not None and ref is not None else None
      cells += [_fmt(ours), _fmt(ref and ref.value), _fmt(delta, "+.1f")]
    used.update(ref.source for ref in row.reference.values())
    lines.append([row.key, row.method, *cells,
                  _fmt(m["seconds_per_query"] if m else None, ".2e"), reference_sources(row),
                  entry["split"] or "missing", entry["source"] or "missing"])
  title = paper_tables.TABLES[table][0]
  md = [f"{title} (table {table}, split {table_split(table)})", "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  md += ["| " + " | ".join(cells) + " |" for cells in lines]
  md += ["", "ref: the published value; delta: ours minus ref; missing: not published (or not "
         "run). Published values:" if used else "No published value for this table."]
  md += [f"- {src}: {paper_numbers.SOURCES[src]}" for src in sorted(used)]
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(COLUMNS)
  writer.writerows(lines)
  return "\n".join(md) + "\n", buf.getvalue()


def _published_text(row: paper_tables.Row) -> str:
  """"t2i R@1 54.7, i2t R@1 70.8 [paper Table 1]; ..." for a row's published cells."""
  by_source = {}
  for cell, ref in row.reference.items():
    by_source.setdefault(ref.source, []).append(f"{cell} {ref.value:g}")
  return "; ".join(f"{', '.join(cells)} [{src}]" for src, cells in by_source.items())


def list_tables() -> str:
  """Every table, its rows' configs and published values with their sources; then the cost
  tables that `rerank.bench` measures."""
  out = []
  for name, (title, rows) in paper_tables.TABLES.items():
    sources = sorted({ref.source for r in rows for ref in r.reference.values()})
    out.append(f"{name}: {title}")
    out.append(f"  published: {'; '.join(sources) if sources else 'none recovered (missing)'}")
    for r in rows:
      where = (f"  evaluated on {r.eval_dataset or 'its dataset'} / {r.eval_split or 'its split'}"
               if r.eval_dataset or r.eval_split else "")
      ref = f"  ref {_published_text(r)}" if r.reference else ""
      out.append(f"  {r.label:<16} {r.config}{where}{ref}")
  out.append("cost (printed by python -m rerank.bench beside its measurements, seconds):")
  for what, table in (("latency per query, 50k images", paper_numbers.LATENCY_50K),
                      ("evaluate MSCOCO 5k test", paper_numbers.EVAL_COCO5K)):
    source = next(iter(table.values())).source
    values = ", ".join(f"{m} {p.value:g}" for m, p in table.items())
    out.append(f"  {what}: {values} [{source}]")
  out.append("sources:")
  out += [f"  {key}: {text}" for key, text in paper_numbers.SOURCES.items()]
  return "\n".join(out) + "\n"


def _write_atomic(path: str, text: str):
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def build_table(table: str, workdirs: dict[str, str]) -> tuple[str, str]:
  """(markdown, csv) of `table` from {row config key: workdir or results JSON}. Raises ValueError."""
  runs = {key: load_run(path) for key, path in workdirs.items()}
  return render(table, collect(table, runs))


def write_table(prefix: str, md: str, table_csv: str):
  """PREFIX.md and PREFIX.csv, each written atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  _write_atomic(prefix + ".md", md)
  _write_atomic(prefix + ".csv", table_csv)


def _parse_workdirs(items: list[str]) -> dict[str, str]:
  out = {}
  for item in items:
    key, eq, path = item.partition("=")
    if not eq or not key or not path:
      raise ValueError(f"--workdirs: expected KEY=PATH (e.g. joint=workdirs/flickr30k_joint); "
                       f"found {item!r}")
    out[key] = path
  return out


def main(argv):
  del argv
  if FLAGS.list:
    print(list_tables(), end="")
    return
  if not FLAGS.table:
    cli.fail(f"--table is required (one of {sorted(paper_tables.TABLES)}), or --list")
  try:
    md, table_csv = build_table(FLAGS.table, _parse_workdirs(FLAGS.workdirs))
  except ValueError as e:
    cli.fail(str(e))
  if FLAGS.out:
    try:
      write_table(FLAGS.out, md, table_csv)
    except OSError as e:
      cli.fail(f"--out {FLAGS.out!r}: cannot write ({e.strerror or e})")
  print(md, end="")
  if FLAGS.out:
    print(f"wrote {FLAGS.out}.md, {FLAGS.out}.csv")


if __name__ == "__main__":
  cli.run(main, define_flags)
