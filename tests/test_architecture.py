"""docs/architecture.md's module map against the package as it is.

The map is the code block after '## Module map': one layer per row (its
name, then modules such as `train` or packages such as `evaluation/`; a
line that starts with spaces continues the row above). Every module of
vmoe_jsd must be in exactly one row, every name must exist, and an import
may only point to the importer's own row or a row below it (the import
graph is test_imports.py's, which counts every import statement).
"""

from __future__ import annotations

import os
import re

import pytest
from test_imports import ROOT, import_graph, package_modules

DOC = os.path.join(ROOT, 'docs', 'architecture.md')


def read_map(text: str) -> list[tuple[str, list[str]]]:
  """[(layer, [entry, ...])] from the first code block after the heading."""
  block = re.search(r'## Module map\n.*?```\n(.*?)```', text, re.S)
  assert block, 'docs/architecture.md has no code block under ## Module map'
  rows: list[tuple[str, list[str]]] = []
  for line in block.group(1).splitlines():
    if not line.strip():
      continue
    if line.startswith(' '):
      rows[-1][1].extend(line.split())
    else:
      layer, *entries = line.split()
      rows.append((layer, entries))
  return rows


def layer_of_modules(rows, modules) -> dict[str, int]:
  """{module: row index}; raises AssertionError on names that do not exist
  and on modules named twice or never."""
  seen: dict[str, int] = {}
  for index, (_, entries) in enumerate(rows):
    for entry in entries:
      if entry.endswith('/'):
        package = 'vmoe_jsd.' + entry[:-1].replace('/', '.')
        members = [
          m for m in modules if m == package or m.startswith(package + '.')
        ]
      else:
        name = 'vmoe_jsd.' + entry.replace('/', '.')
        members = [name] if name in modules else []
      assert members, f'the map names {entry!r}, which is not in vmoe_jsd/'
      for m in members:
        assert m not in seen, f'{m} is in the map twice'
        seen[m] = index
  missing = sorted(set(modules) - set(seen) - {'vmoe_jsd'})
  assert not missing, f'modules missing from the map: {missing}'
  return seen


def upward_imports(graph, layer) -> list[str]:
  """'a -> b' for every import that points to a row above the importer's."""
  return sorted(
    f'{a} -> {b}'
    for a, targets in graph.items()
    if a in layer
    for b in targets
    if b in layer and layer[b] < layer[a]
  )


def test_the_module_map_matches_the_package_and_its_imports():
  with open(DOC, encoding='utf-8') as f:
    rows = read_map(f.read())
  layer = layer_of_modules(rows, package_modules())
  assert upward_imports(import_graph(), layer) == []


def test_the_checks_catch_a_stale_map():
  text = '## Module map\n\n```\ntop   a  pkg/\n      b\nlow   c\n```\n'
  rows = read_map(text)
  assert rows == [('top', ['a', 'pkg/', 'b']), ('low', ['c'])]
  modules = {
    m: None
    for m in (
      'vmoe_jsd',
      'vmoe_jsd.a',
      'vmoe_jsd.b',
      'vmoe_jsd.c',
      'vmoe_jsd.pkg',
      'vmoe_jsd.pkg.x',
    )
  }
  layer = layer_of_modules(rows, modules)
  assert layer['vmoe_jsd.pkg.x'] == 0 and layer['vmoe_jsd.c'] == 1
  graph = {'vmoe_jsd.a': {'vmoe_jsd.c'}, 'vmoe_jsd.c': {'vmoe_jsd.pkg.x'}}
  assert upward_imports(graph, layer) == ['vmoe_jsd.c -> vmoe_jsd.pkg.x']
  with pytest.raises(AssertionError, match='missing from the map'):
    layer_of_modules(rows, {**modules, 'vmoe_jsd.d': None})
  with pytest.raises(AssertionError, match="names 'c'"):
    layer_of_modules(rows, {m: None for m in modules if m != 'vmoe_jsd.c'})
  twice = read_map(text.replace('low   c', 'low   c  a'))
  with pytest.raises(AssertionError, match='twice'):
    layer_of_modules(twice, modules)
