"""Finds import cycles between the modules of flanjax (no module is imported).

  python tools/import_cycles.py                      # errors: module-level cycles
  python tools/import_cycles.py --strict             # lazy (function-level) cycles too
  python tools/import_cycles.py --within flanjax.data --strict

Every module under flanjax/ is parsed with ast. An import at module level
(class bodies and try/if blocks included) runs when the module is imported; an
import inside a function runs when it is called (a lazy import). ``if
TYPE_CHECKING:`` imports never run and are left out. ``from pkg import mod``
depends on pkg.mod (and on pkg's __init__ unless pkg is a package the
importer is inside, which Python has already started importing); ``from pkg
import name`` depends on pkg's __init__.

A cycle among module-level imports is an error: which module sees the other
half-initialised depends on which is imported first. A cycle that needs a
lazy import is listed as info, or is an error with --strict. Exits 1 when
there is an error, else 0.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import os
import sys
from typing import Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Edge:
  src: str
  dst: str
  path: str  # file of src, relative to the repository
  line: int
  lazy: bool  # inside a function


def module_names(root: str, package: str) -> dict[str, str]:
  """Dotted module name -> file, for every .py file under `root` (the package's folder)."""
  out = {}
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
    rel = os.path.relpath(folder, root)
    parts = [package] + ([] if rel == "." else rel.split(os.sep))
    if "__init__.py" not in files:
      continue  # not a package: nothing in it is importable as package.x
    for f in sorted(files):
      if not f.endswith(".py"):
        continue
      name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
      out[name] = os.path.join(folder, f)
  return out


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterable[tuple[ast.stmt, bool]]:
  """(import statement, lazy) pairs; TYPE_CHECKING blocks skipped."""
  def walk(node, lazy):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        yield child, lazy
      elif isinstance(child, ast.If) and _is_type_checking(child.test):
        for stmt in child.orelse:
          yield from walk(ast.Module(body=[stmt], type_ignores=[]), lazy)
      elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        yield from walk(child, True)
      else:
        yield from walk(child, lazy)
  yield from walk(tree, False)


def _packages_of(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def edges_of(name: str, path: str, modules: dict[str, str]) -> list[Edge]:
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  here = name if is_package else name.rpartition(".")[0]
  inside = set(_packages_of(name)) | {name}  # already being imported when `name` runs
  rel = os.path.relpath(path, REPO)
  out = []

  def add(dst, node, lazy):
    # Importing a.b.c runs a and a.b first (those not already started).
    for target in _packages_of(dst) + [dst]:
      if target in modules and target not in inside:
        out.append(Edge(name, target, rel, node.lineno, lazy))

  for node, lazy in _imports(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node, lazy)
      continue
    if node.level:
      base_parts = here.split(".")
      base_parts = base_parts[:len(base_parts) - (node.level - 1)]
      base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
      base = node.module or ""
    for alias in node.names:
      sub = f"{base}.{alias.name}"
      if sub in modules:
        add(sub, node, lazy)
      elif base in modules:
        if base in inside and base != name:
          # A name from the __init__ of a package this module is in: the
          # __init__ must have defined it already, a real dependency.
          out.append(Edge(name, base, rel, node.lineno, lazy))
        else:
          add(base, node, lazy)
  return out


def strongly_connected(nodes: Iterable[str], succ: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm, iterative; components of more than one node (or a self-loop)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = [0]
  for root in sorted(nodes):
    if root in index:
      continue
    work = [(root, iter(sorted(succ.get(root, ()))))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      v, it = work[-1]
      for w in it:
        if w not in index:
          index[w] = low[w] = counter[0]
          counter[0] += 1
          stack.append(w)
          on_stack.add(w)
          work.append((w, iter(sorted(succ.get(w, ())))))
          break
        if w in on_stack:
          low[v] = min(low[v], index[w])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[v])
        if low[v] == index[v]:
          comp = []
          while True:
            w = stack.pop()
            on_stack.discard(w)
            comp.append(w)
            if w == v:
              break
          if len(comp) > 1 or v in succ.get(v, ()):
            out.append(sorted(comp))
  return out


def shortest_cycle(comp: list[str], succ: dict[str, set[str]]) -> list[str]:
  """A shortest cycle through the first module of a component, as a closed path."""
  members = set(comp)
  start = comp[0]
  prev = {start: None}
  queue = collections.deque([start])
  while queue:
    v = queue.popleft()
    for w in sorted(succ.get(v, ())):
      if w not in members:
        continue
      if w == start:
        path = [v]
        while prev[path[-1]] is not None:
          path.append(prev[path[-1]])
        return list(reversed(path)) + [start]
      if w not in prev:
        prev[w] = v
        queue.append(w)
  return comp + [comp[0]]


def analyse(package_dir: str, package: str, within: str | None = None):
  modules = module_names(package_dir, package)
  edges = []
  for name, path in sorted(modules.items()):
    edges.extend(edges_of(name, path, modules))
  if within:
    keep = lambda m: m == within or m.startswith(within + ".")  # noqa: E731
    edges = [e for e in edges if keep(e.src) and keep(e.dst)]
  return modules, edges


def _graph(edges: list[Edge]) -> dict[str, set[str]]:
  succ = collections.defaultdict(set)
  for e in edges:
    succ[e.src].add(e.dst)
  return succ


def _describe(cycle: list[str], edges: list[Edge]) -> list[str]:
  lines = []
  for a, b in zip(cycle, cycle[1:]):
    e = min((e for e in edges if e.src == a and e.dst == b), key=lambda e: (e.lazy, e.line))
    lines.append(f"    {e.path}:{e.line}: {a} imports {b}{' (in a function)' if e.lazy else ''}")
  return lines


def find_cycles(edges: list[Edge]) -> tuple[list[list[str]], list[list[str]]]:
  """(module-level cycles, cycles that need a lazy import), each a closed path."""
  eager = [e for e in edges if not e.lazy]
  g_eager, g_all = _graph(eager), _graph(edges)
  nodes = {e.src for e in edges} | {e.dst for e in edges}
  errors = [shortest_cycle(c, g_eager) for c in strongly_connected(nodes, g_eager)]
  eager_sets = [set(c) for c in strongly_connected(nodes, g_eager)]
  lazy = []
  for comp in strongly_connected(nodes, g_all):
    if set(comp) not in eager_sets:
      lazy.append(shortest_cycle(comp, g_all))
  return errors, lazy


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="import_cycles", description=__doc__.split("\n")[0])
  ap.add_argument("--package_dir", default=os.path.join(REPO, "flanjax"))
  ap.add_argument("--within", default=None,
                  help="only imports between modules of this package (e.g. flanjax.data)")
  ap.add_argument("--strict", action="store_true",
                  help="cycles through function-level (lazy) imports are errors too")
  ap.add_argument("-v", "--verbose", action="store_true",
                  help="also list every function-level import between the modules")
  args = ap.parse_args(argv)
  package = os.path.basename(os.path.normpath(args.package_dir))
  modules, edges = analyse(args.package_dir, package, args.within)
  errors, lazy = find_cycles(edges)
  n_lazy = sum(e.lazy for e in edges)
  scope = f" within {args.within}" if args.within else ""
  for cycle in errors:
    print(f"error: import cycle at module level: {' -> '.join(cycle)}")
    print("\n".join(_describe(cycle, [e for e in edges if not e.lazy])))
  for cycle in lazy:
    kind = "error" if args.strict else "info"
    print(f"{kind}: import cycle through a function-level import: {' -> '.join(cycle)}")
    print("\n".join(_describe(cycle, edges)))
  if args.verbose:
    for e in edges:
      if e.lazy:
        print(f"info: {e.path}:{e.line}: {e.src} imports {e.dst} in a function")
  print(f"{len(modules)} modules, {len(edges) - n_lazy} module-level and {n_lazy} function-level "
        f"imports{scope}: {len(errors)} module-level cycles, {len(lazy)} through lazy imports")
  return 1 if errors or (args.strict and lazy) else 0


if __name__ == "__main__":
  sys.exit(main())
