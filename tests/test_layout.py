"""The package's architecture, checked: layers, no import cycles, entry points apart.

docs/DESIGN.md ("Layers") draws the diagram these tests enforce. Imports are read with `ast`
(also those inside functions), so a lazy import cannot hide a cycle or a wrong-way edge.
"""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "rerank")

# Library sub-packages and the sub-packages each may import (besides itself).
# rerank.errors (the user-error type) sits below them all; every layer may raise it.
LAYERS = {
    "rerank.errors": set(),
    "rerank.models": {"rerank.errors"},
    "rerank.data": {"rerank.errors"},
    "rerank.indexing": {"rerank.errors"},
    "rerank.training": {"rerank.errors", "rerank.models", "rerank.data", "rerank.indexing"},
    "rerank.inference": {"rerank.errors", "rerank.models", "rerank.data", "rerank.indexing",
                         "rerank.training"},
    "rerank.evaluation": {"rerank.errors", "rerank.models", "rerank.data", "rerank.indexing",
                          "rerank.inference"},
}
# rerank.paths (local and gs:// files through etils.epath) lies below every layer.
LAYERS = {"rerank.paths": set(), **{k: v | {"rerank.paths"} for k, v in LAYERS.items()}}
# Entry points (`python -m NAME`) that live inside a library sub-package.
NESTED_ENTRY_POINTS = {"rerank.data.prepare", "rerank.data.benchmark"}


def _modules() -> dict[str, str]:
  """Module name -> file path, for every module of the package."""
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
  return out


def _imports(path: str, name: str, known: set[str]) -> set[str]:
  """The package modules `name` imports, anywhere in its file."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split(".")[0] == "rerank")
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      if base.split(".")[0] != "rerank":
        continue
      for a in node.names:  # `from rerank.x import y`: y may be a module or a name in x
        out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return {m for m in out if m in known and m != name}


def _graph():
  mods = _modules()
  return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def _layer(module: str) -> str | None:
  for layer in LAYERS:
    if module == layer or module.startswith(layer + "."):
      return layer
  return None


def _is_entry_point(module: str) -> bool:
  """Top-level modules of the package are commands (bar the package, rerank.cli and the layers)."""
  if module in NESTED_ENTRY_POINTS:
    return True
  return module.count(".") == 1 and module != "rerank.cli" and module not in LAYERS


def _cycles(graph) -> list[list[str]]:
  """Every strongly connected component with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_import_reader_sees_lazy_and_aliased_imports(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("from rerank.models import heads as h\n"
                 "def f():\n  from rerank import train  # noqa\n  import rerank.data.batches\n")
  known = {"rerank.models", "rerank.models.heads", "rerank.train", "rerank.data.batches"}
  assert _imports(str(src), "rerank.evaluation.x", known) == {
      "rerank.models.heads", "rerank.train", "rerank.data.batches"}


def test_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def test_library_never_imports_an_entry_point_or_the_cli():
  bad = [f"{m} imports {d}" for m, deps in _graph().items() if not _is_entry_point(m)
         for d in deps if _is_entry_point(d) or d == "rerank.cli"]
  assert bad == []


def test_layers_import_only_what_they_may():
  bad = []
  for module, deps in _graph().items():
    layer = _layer(module)
    if layer is None or module in NESTED_ENTRY_POINTS:
      continue
    for dep in deps:
      other = _layer(dep)
      if other is not None and other != layer and other not in LAYERS[layer]:
        bad.append(f"{module} ({layer}) imports {dep} ({other})")
  assert bad == []


def test_every_library_module_is_in_a_layer():
  stray = [m for m in _modules() if m not in ("rerank", "rerank.cli")
           and not _is_entry_point(m) and _layer(m) is None]
  assert stray == []


def test_every_module_imports_in_one_process_and_defines_no_flags():
  """Entry points define their flags only when run, so importing all of them never clashes."""
  code = ("import importlib, pkgutil, rerank\n"
          "from absl import flags\n"
          "names = [m.name for m in pkgutil.walk_packages(rerank.__path__, 'rerank.')]\n"
          "for n in names: importlib.import_module(n)\n"
          "ours = [f for f in flags.FLAGS if (flags.FLAGS.find_module_defining_flag(f) or '')"
          ".startswith('rerank')]\n"
          "print(len(names), sorted(ours))\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=False, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  count, defined = res.stdout.split(" ", 1)
  assert int(count) >= 40
  assert defined.strip() == "[]"
