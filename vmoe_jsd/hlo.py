"""Collectives of a compiled XLA program, read from its HLO text.

`Compiled.as_text()` prints each collective as one instruction, e.g.

  %all-to-all.3 = (f32[1,4,2,12,32]{...}, ...) all-to-all(%a, %b), ...,
      replica_groups={{0,1,2,3},{4,5,6,7}}, ...

Its device groups come in one of three forms, all parsed here:
  - explicit: `{{0,1},{2,3}}` (`{}`: one group of all devices);
  - iota: `[G,N]<=[D]` is iota(D) reshaped to G groups of N, and
    `[G,N]<=[d0,d1,...]T(p0,p1,...)` is iota(prod d) reshaped to (d0, d1,
    ...), transposed by p, then reshaped to (G, N);
  - mesh: `mesh['a'=4,'b'=2] {'a'}`: devices numbered row-major over the
    named dimensions, one group per value of the dimensions NOT listed.
A collective-permute has `source_target_pairs={{0,1},{1,2}}` instead.

The ids are partition ids under SPMD (`use_global_device_ids=true` with one
replica), i.e. flat positions in `mesh.devices`; `spanned_axes` maps a group
to the mesh axes along which its members' coordinates differ.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

KINDS = (
  'all-to-all',
  'all-gather',
  'all-reduce',
  'reduce-scatter',
  'collective-permute',
  'collective-broadcast',
  'ragged-all-to-all',
)

DTYPE_BYTES = {  # Bytes per element of each HLO element type.
  **dict.fromkeys(('s4', 'u4'), 0.5),
  **dict.fromkeys(('pred', 's8', 'u8', 'f8e4m3fn', 'f8e5m2'), 1),
  **dict.fromkeys(('s16', 'u16', 'f16', 'bf16'), 2),
  **dict.fromkeys(('s32', 'u32', 'f32'), 4),
  **dict.fromkeys(('s64', 'u64', 'f64', 'c64'), 8),
  'c128': 16,
}

_SHAPE = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r')\[([\d,]*)\]')
_INSTRUCTION = re.compile(
  r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<type>.*?) '
  r'(?P<kind>' + '|'.join(KINDS) + r')(?P<start>-start)?\('
)
_METADATA_OP = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction.

  Attributes:
    kind: 'all-to-all', 'all-gather', 'all-reduce', ...
    name: the HLO instruction name.
    bytes: size of its result on each device (for async '-start' forms, the
      last element of the result tuple, the output buffer).
    groups: device groups (partition ids); for collective-permute the
      (source, target) pairs.
    op_name: the JAX op_name of its metadata ('' when absent).
  """

  kind: str
  name: str
  bytes: int
  groups: tuple[tuple[int, ...], ...]
  op_name: str


def shape_bytes(type_text: str) -> int:
  """Bytes of every array shape in an HLO type, e.g. '(f32[2,3], s32[])'."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(type_text):
    size = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total += DTYPE_BYTES[dtype] * size
  return int(math.ceil(total))


def _braced_int_lists(text: str) -> list[list[int]]:
  """'{{0,1},{2,3}}' -> [[0, 1], [2, 3]]."""
  inner = text.strip()
  if not (inner.startswith('{') and inner.endswith('}')):
    raise ValueError(f'not a braced list of groups: {text!r}')
  inner = inner[1:-1].strip()
  if not inner:
    return []
  groups = re.findall(r'\{([^{}]*)\}', inner)
  return [[int(v) for v in g.split(',') if v.strip()] for g in groups]


def parse_replica_groups(
  text: str, num_devices: int | None = None
) -> list[list[int]]:
  """The groups (lists of partition ids) of a `replica_groups=` value in any
  of the three forms: '{{0,1},{2,3}}', '[2,2]<=[4]', '[2,2]<=[2,2]T(1,0)' or
  "mesh['x'=2,'y'=2] {'x'}"; `num_devices` is needed only for '{}' (all)."""
  text = text.strip()
  if text.startswith('mesh['):
    m = re.fullmatch(r'mesh\[([^\]]*)\]\s*\{([^}]*)\}', text)
    if not m:
      raise ValueError(f'unparsed mesh replica groups {text!r}')
    dims = re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))
    names, shape = [n for n, _ in dims], [int(s) for _, s in dims]
    grouped = re.findall(r"'([^']+)'", m.group(2))
    unknown = set(grouped) - set(names)
    if unknown:
      raise ValueError(f'axes {sorted(unknown)} not in the mesh of {text!r}')
    inner = [names.index(n) for n in grouped]
    outer = [i for i in range(len(names)) if i not in inner]
    ids = np.arange(math.prod(shape)).reshape(shape).transpose(outer + inner)
    return ids.reshape(-1, math.prod(shape[i] for i in inner)).tolist()
  if text.startswith('['):
    m = re.fullmatch(
      r'\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', text.replace(' ', '')
    )
    if not m:
      raise ValueError(f'unparsed iota replica groups {text!r}')
    out_shape = [int(v) for v in m.group(1).split(',')]
    src_shape = [int(v) for v in m.group(2).split(',')]
    ids = np.arange(math.prod(src_shape)).reshape(src_shape)
    if m.group(3):
      ids = ids.transpose([int(v) for v in m.group(3).split(',')])
    if len(out_shape) != 2 or math.prod(out_shape) != ids.size:
      raise ValueError(f'iota groups {text!r}: bad group shape {out_shape}')
    return ids.reshape(out_shape).tolist()
  groups = _braced_int_lists(text)
  if not groups:
    if num_devices is None:
      raise ValueError(f'{text!r} means all devices: give num_devices')
    return [list(range(num_devices))]
  return groups


def _attribute(line: str, key: str) -> str | None:
  """The value of `key=` in an instruction line (balanced braces, iota or
  mesh forms), or None."""
  start = line.find(key + '=')
  if start < 0:
    return None
  i = start + len(key) + 1
  if line.startswith('mesh[', i):
    m = re.compile(r'mesh\[[^\]]*\]\s*\{[^}]*\}').match(line, i)
    return m.group(0) if m else None
  if line.startswith('[', i):
    m = re.compile(r'\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?').match(line, i)
    return m.group(0) if m else None
  depth = 0
  for j in range(i, len(line)):
    if line[j] == '{':
      depth += 1
    elif line[j] == '}':
      depth -= 1
      if depth == 0:
        return line[i : j + 1]
  return None


def parse_collectives(
  hlo_text: str, num_devices: int | None = None
) -> list[Collective]:
  """Every collective instruction of an HLO module's text (done-halves of
  async pairs are skipped; their '-start' carries the groups)."""
  out = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    kind, type_text = m.group('kind'), m.group('type')
    if m.group('start'):
      shapes = _SHAPE.findall(type_text)
      type_text = f'{shapes[-1][0]}[{shapes[-1][1]}]' if shapes else ''
    if kind == 'collective-permute':
      pairs = _attribute(line, 'source_target_pairs')
      groups = _braced_int_lists(pairs) if pairs else []
    else:
      value = _attribute(line, 'replica_groups')
      groups = (
        parse_replica_groups(value, num_devices)
        if value is not None
        else [list(range(num_devices or 0))]
      )
    op = _METADATA_OP.search(line)
    out.append(
      Collective(
        kind=kind,
        name=m.group('name'),
        bytes=shape_bytes(type_text),
        groups=tuple(tuple(g) for g in groups),
        op_name=op.group(1) if op else '',
      )
    )
  return out


def spanned_axes(
  groups: Sequence[Sequence[int]], device_ids, axis_names: Sequence[str]
) -> tuple[str, ...]:
  """Mesh axes (in mesh order; () when every group has one device) along
  which the members of some group (partition ids, or permute pairs) differ.
  `device_ids` is an array of the mesh's shape holding partition ids
  (np.arange(n).reshape(mesh.devices.shape) under SPMD)."""

  device_ids = np.asarray(device_ids)
  coords = {
    int(pid): idx for idx, pid in np.ndenumerate(device_ids) if pid >= 0
  }
  spanned = set()
  for group in groups:
    if not group:
      continue
    try:
      points = np.array([coords[int(p)] for p in group])
    except KeyError as e:
      raise ValueError(
        f'partition id {e.args[0]} is not in the mesh of shape '
        f'{device_ids.shape}'
      ) from None
    for axis in range(points.shape[1]):
      if len(set(points[:, axis])) > 1:
        spanned.add(axis)
  return tuple(axis_names[a] for a in sorted(spanned))
