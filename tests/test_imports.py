"""The structure of the vmoe_jsd package, read from its source with `ast`.

1. No import cycle between its modules. Every import statement counts, at
   the top of a module or inside a function (a function-level import in a
   cycle only moves the failure to run time). Edges follow what Python
   executes:
     import vmoe_jsd.a.b            -> vmoe_jsd.a.b, and the packages
                                       vmoe_jsd, vmoe_jsd.a
     from vmoe_jsd.a import x       -> vmoe_jsd.a (its __init__ gives x),
                                       and vmoe_jsd.a.x when x is a module
     from . import x, from .m import y   the same, resolved relatively.
   Packages above a module are started before it by Python's import
   system, so `from P import submodule` inside package P (e.g. routing.py's
   `from vmoe_jsd.models import moe`) is an edge to the submodule only: it
   needs nothing from P's __init__. Any other name taken from P (a function
   or class of P's __init__) is an edge to P, wherever the importer lives.
2. No function of the package is longer than 80 lines (the config builders
   in vmoe_jsd/config_common.py excepted: they are long lists of values).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'vmoe_jsd'
MAX_FUNCTION_LINES = 80
LENGTH_EXEMPT = ('vmoe_jsd/config_common.py',)


# ----------------------------------------------------------------------------
# Reading the package.
# ----------------------------------------------------------------------------
def package_modules(root: str = ROOT) -> dict[str, tuple[str, bool]]:
  """{dotted module name: (path relative to root, is a package __init__)}."""
  out = {}
  for folder, dirs, files in os.walk(os.path.join(root, PACKAGE)):
    dirs[:] = sorted(d for d in dirs if not d.startswith(('.', '__')))
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      rel = os.path.relpath(os.path.join(folder, name), root)
      parts = rel[: -len('.py')].split(os.sep)
      is_package = parts[-1] == '__init__'
      if is_package:
        parts = parts[:-1]
      out['.'.join(parts)] = (rel, is_package)
  return out


def _ancestors(module: str) -> list[str]:
  """'a.b.c' -> ['a', 'a.b']."""
  parts = module.split('.')
  return ['.'.join(parts[:i]) for i in range(1, len(parts))]


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The absolute module name of a `from X import ...` statement."""
  if not node.level:
    return node.module or ''
  # Relative: the importer's package, then one level up per extra dot.
  base = module.split('.') if is_package else module.split('.')[:-1]
  if node.level > 1:
    base = base[: -(node.level - 1)]
  return '.'.join(base + ([node.module] if node.module else []))


def import_edges(
  module: str, source: str, is_package: bool, modules: Iterable[str]
) -> set[str]:
  """The package modules that `module` (its `source`) imports, anywhere in
  the file (see the module docstring for the rules)."""
  known = set(modules)
  # Started before `module` by Python itself: never a dependency on their
  # __init__ for a submodule import.
  started = set(_ancestors(module)) | ({module} if is_package else set())
  edges = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        name = alias.name
        edges |= {p for p in _ancestors(name) if p not in started}
        edges.add(name)
    elif isinstance(node, ast.ImportFrom):
      target = _resolve_from(node, module, is_package)
      edges |= {p for p in _ancestors(target) if p not in started}
      names = [alias.name for alias in node.names]
      submodules = [f'{target}.{n}' for n in names if f'{target}.{n}' in known]
      edges |= set(submodules)
      if target not in started or len(submodules) < len(names):
        edges.add(target)  # Its __init__ runs, or gives a name that is no
        # module ('*' included).
  return {e for e in edges if e in known and e != module}


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  """{module: the package modules it imports} over all of vmoe_jsd."""
  modules = package_modules(root)
  graph = {}
  for name, (rel, is_package) in modules.items():
    with open(os.path.join(root, rel), encoding='utf-8') as f:
      graph[name] = import_edges(name, f.read(), is_package, modules)
  return graph


# ----------------------------------------------------------------------------
# Cycles: Tarjan's strongly connected components, then one cycle in each.
# ----------------------------------------------------------------------------
def strongly_connected_components(
  graph: Mapping[str, Iterable[str]],
) -> list[list[str]]:
  """Tarjan's algorithm (iterative), each component sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  on_stack: set[str] = set()
  stack: list[str] = []
  components = []
  nodes = sorted(set(graph) | {w for vs in graph.values() for w in vs})
  for start in nodes:
    if start in index:
      continue
    work = [(start, iter(sorted(graph.get(start, ()))))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      v, children = work[-1]
      for w in children:
        if w not in index:
          index[w] = low[w] = len(index)
          stack.append(w)
          on_stack.add(w)
          work.append((w, iter(sorted(graph.get(w, ())))))
          break
        if w in on_stack:
          low[v] = min(low[v], index[w])
      else:
        work.pop()
        if work:
          parent = work[-1][0]
          low[parent] = min(low[parent], low[v])
        if low[v] == index[v]:
          component = []
          while True:
            w = stack.pop()
            on_stack.discard(w)
            component.append(w)
            if w == v:
              break
          components.append(sorted(component))
  return components


def _cycle_through(graph, component: list[str]) -> list[str]:
  """A shortest cycle from the component's first node back to it (a
  breadth-first search inside the component)."""
  inside, start = set(component), component[0]
  parent = {start: None}
  queue = [start]
  for v in queue:
    for w in sorted(graph.get(v, ())):
      if w == start:
        path = [v]
        while parent[path[-1]] is not None:
          path.append(parent[path[-1]])
        return [*reversed(path), start]
      if w in inside and w not in parent:
        parent[w] = v
        queue.append(w)
  raise AssertionError(f'{component} holds no cycle')


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
  """One cycle [a, b, ..., a] per cyclic component (self-imports too)."""
  cycles = []
  for component in strongly_connected_components(graph):
    node = component[0]
    if len(component) > 1 or node in graph.get(node, ()):
      cycles.append(_cycle_through(graph, component))
  return cycles


# ----------------------------------------------------------------------------
# The cycle finder and the edge rules on hand-made input.
# ----------------------------------------------------------------------------
def test_cycle_finder_on_hand_made_graphs():
  acyclic = {'a': {'b', 'c'}, 'b': {'c', 'd'}, 'c': {'d'}, 'd': set()}
  assert find_cycles(acyclic) == []
  assert sorted(strongly_connected_components(acyclic)) == [
    ['a'],
    ['b'],
    ['c'],
    ['d'],
  ]
  cyclic = {**acyclic, 'd': {'b'}, 'e': {'e'}, 'f': {'a'}}
  cycles = find_cycles(cyclic)
  # b -> c -> d -> b and b -> d -> b: one component, its shortest cycle;
  # and the self-import of e.
  assert sorted(cycles) == [['b', 'd', 'b'], ['e', 'e']]
  assert ['b', 'c', 'd'] in strongly_connected_components(cyclic)
  # Long chains are fine (no recursion limit).
  chain = {str(i): {str(i + 1)} for i in range(5000)}
  assert find_cycles(chain) == []
  chain['5000'] = {'0'}
  (cycle,) = find_cycles(chain)
  assert len(cycle) == 5002 and cycle[0] == cycle[-1] == '0'


MODULES = (
  'vmoe_jsd',
  'vmoe_jsd.step',
  'vmoe_jsd.models',
  'vmoe_jsd.models.moe',
  'vmoe_jsd.models.routing',
  'vmoe_jsd.models.spec',
)


@pytest.mark.parametrize(
  'module,is_package,source,expected',
  [
    # spec.py takes functions of the package __init__ and a submodule.
    ('vmoe_jsd.models.spec', False,
     'from vmoe_jsd.models import build_model, routing',
     {'vmoe_jsd.models', 'vmoe_jsd.models.routing'}),
    # From outside the package, its __init__ runs first.
    ('vmoe_jsd.step', False, 'from vmoe_jsd.models import routing',
     {'vmoe_jsd.models', 'vmoe_jsd.models.routing'}),
    # A sibling submodule only: the package is started already.
    ('vmoe_jsd.models.routing', False, 'from vmoe_jsd.models import moe',
     {'vmoe_jsd.models.moe'}),
    ('vmoe_jsd.models.routing', False, 'from . import moe',
     {'vmoe_jsd.models.moe'}),
    ('vmoe_jsd.models.routing', False, 'from .moe import f',
     {'vmoe_jsd.models.moe'}),
    ('vmoe_jsd.models.routing', False, 'from .. import step',
     {'vmoe_jsd.step'}),
    ('vmoe_jsd.models', True, 'from . import routing\nfrom .spec import x',
     {'vmoe_jsd.models.routing', 'vmoe_jsd.models.spec'}),
    ('vmoe_jsd.step', False, 'import vmoe_jsd.models.moe as m',
     {'vmoe_jsd.models', 'vmoe_jsd.models.moe'}),
    # Inside a function, and names that are not package modules.
    ('vmoe_jsd.step', False,
     'import jax\ndef f():\n  from vmoe_jsd.models.spec import ModelSpec\n',
     {'vmoe_jsd.models', 'vmoe_jsd.models.spec'}),
    # A name of the top package's __init__ (none today, but it would count).
    ('vmoe_jsd.step', False, 'from vmoe_jsd import models, f',
     {'vmoe_jsd', 'vmoe_jsd.models'}),
    ('vmoe_jsd.step', False, 'from vmoe_jsd import models',
     {'vmoe_jsd.models'}),
  ],
)  # fmt: skip
def test_import_edges_follow_what_python_runs(
  module, is_package, source, expected
):
  assert import_edges(module, source, is_package, MODULES) == expected


def test_a_cycle_through_a_package_init_is_found():
  """models/__init__ importing spec, which takes build_model from it."""
  graph = {
    'vmoe_jsd.models': import_edges(
      'vmoe_jsd.models', 'from vmoe_jsd.models import spec', True, MODULES
    ),
    'vmoe_jsd.models.spec': import_edges(
      'vmoe_jsd.models.spec',
      'from vmoe_jsd.models import build_model',
      False,
      MODULES,
    ),
  }
  assert find_cycles(graph) == [
    ['vmoe_jsd.models', 'vmoe_jsd.models.spec', 'vmoe_jsd.models']
  ]


# ----------------------------------------------------------------------------
# The package itself.
# ----------------------------------------------------------------------------
def test_the_import_graph_reads_every_module():
  graph = import_graph()
  assert set(graph) == set(package_modules())
  assert {'vmoe_jsd.train', 'vmoe_jsd.models', 'vmoe_jsd.models.spec'} <= set(
    graph
  )
  assert 'vmoe_jsd.step' in graph['vmoe_jsd.train']


def test_vmoe_jsd_has_no_import_cycle():
  cycles = find_cycles(import_graph())
  assert not cycles, 'import cycles in vmoe_jsd:\n' + '\n'.join(
    '  ' + ' -> '.join(cycle) for cycle in cycles
  )


def function_lengths_in(source: str) -> list[tuple[int, str, int]]:
  """(line, qualified name, lines) of every function and method in
  `source`, nested ones included (decorators not counted)."""
  out = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      name = prefix
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        name = f'{prefix}{child.name}'
        out.append((child.lineno, name, child.end_lineno - child.lineno + 1))
        name += '.'
      elif isinstance(child, ast.ClassDef):
        name = f'{prefix}{child.name}.'
      visit(child, name)

  visit(ast.parse(source), '')
  return out


def test_function_lengths_on_hand_made_source():
  source = (
    'import x\n'
    '@decorator\n'
    'def f(a,\n'
    '      b):\n'
    '  """Doc."""\n'
    '  def inner():\n'
    '    return 1\n'
    '\n'
    '  return inner\n'
    'class C:\n'
    '  async def m(self):\n'
    '    pass\n'
  )
  assert function_lengths_in(source) == [
    (3, 'f', 7),
    (6, 'f.inner', 2),
    (11, 'C.m', 2),
  ]


def test_no_function_is_longer_than_80_lines():
  offenders = []
  for rel, _ in package_modules().values():
    if rel.replace(os.sep, '/') in LENGTH_EXEMPT:
      continue
    with open(os.path.join(ROOT, rel), encoding='utf-8') as f:
      for line, name, n in function_lengths_in(f.read()):
        if n > MAX_FUNCTION_LINES:
          offenders.append(f'  {rel}:{line} {name}: {n} lines')
  assert not offenders, (
    f'functions longer than {MAX_FUNCTION_LINES} lines:\n'
    + '\n'.join(offenders)
  )
