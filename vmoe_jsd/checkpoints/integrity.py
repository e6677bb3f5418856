"""Integrity of saved arrays: a CRC-32C of every array, and finiteness.

orbax and tensorstore keep no checksum of the data, so a flipped bit on disk
would restore silently. Each save records the CRC-32C of every array (the
`integrity` item of the step, JSON) and a restore compares what it read with
it (docs/checkpoints_and_storage.md, "Damaged checkpoints").
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vmoe_jsd import paths
from vmoe_jsd.checkpoints.tree import array_names

INTEGRITY_ITEM = 'integrity'  # The step's JSON item holding the checksums.
CHECKSUM_ALGORITHM = 'crc32c of the row-major bytes of each whole array'
_CRC32C_POLY = 0x82F63B78  # Castagnoli et al. (1993), bit-reflected.


class IntegrityError(ValueError):
  """A restored array differs from its saved checksum, or is not finite."""


# ----------------------------------------------------------------------------
# Combining CRCs: google_crc32c computes them but cannot combine them.
# ----------------------------------------------------------------------------
def _multmodp(a: int, b: int) -> int:
  """a(x) * b(x) modulo the CRC-32C polynomial, bit-reflected (bit 31 is
  x^0), as zlib's crc32.c computes it for its own polynomial."""
  m, p = 1 << 31, 0
  while True:
    if a & m:
      p ^= b
      if not a & (m - 1):
        return p
    m >>= 1
    b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1


@functools.lru_cache(maxsize=1024)
def _x8nmodp(num_bytes: int) -> int:
  """x^(8 * num_bytes) mod P, by repeated squaring (zlib's table of
  x^(2^k) wraps after 32 entries, true for its polynomial only: for
  CRC-32C's, x^(2^31) = x)."""
  p, power = 1 << 31, 1 << 23  # x^0, x^8
  while num_bytes:
    if num_bytes & 1:
      p = _multmodp(power, p)
    power = _multmodp(power, power)
    num_bytes >>= 1
  return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
  """CRC-32C of A + B from crc1 = CRC(A), crc2 = CRC(B) and len2 = len(B)
  in bytes (the algebra of zlib's crc32_combine, for CRC-32C's
  polynomial; CRC(A + B) = CRC(A) * x^(8 len2) + CRC(B) mod P, where the
  pre- and post-inversions cancel out)."""
  return _multmodp(_x8nmodp(len2), crc1) ^ crc2


# ----------------------------------------------------------------------------
# The pieces of a sharded array.
# ----------------------------------------------------------------------------
def _bounds(index: tuple, shape: tuple[int, ...]) -> tuple:
  """((start, stop) per axis) of a shard's index (slices)."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _runs(bounds: tuple, shape: tuple[int, ...]):
  """The contiguous pieces of a shard within the row-major whole array.

  Yields:
    (local index of the piece's leading axes, its offset in the whole
    array, its length), offsets and lengths in elements. A shard of whole
    trailing axes (any shard of a leading-axis sharding) is one piece.
  """
  strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
  r = len(shape)
  while r and bounds[r - 1] == (0, shape[r - 1]):
    r -= 1
  if r == 0:
    yield (), 0, math.prod(shape)
    return
  start, stop = bounds[r - 1]
  lead = bounds[: r - 1]
  for idx in itertools.product(*(range(a, b) for a, b in lead)):
    offset = sum(i * s for i, s in zip(idx, strides, strict=False))
    local = tuple(i - a for i, (a, _) in zip(idx, lead, strict=True))
    yield (
      local,
      offset + start * strides[r - 1],
      (stop - start) * strides[r - 1],
    )


def _pieces(x) -> dict[tuple, Any]:
  """{bounds: one copy} of the distinct shards this process holds."""
  if not isinstance(x, jax.Array):
    return {tuple((0, n) for n in np.shape(x)): x}
  held = {}
  for shard in x.addressable_shards:
    held.setdefault(_bounds(shard.index, x.shape), shard.data)
  return held


@functools.lru_cache(maxsize=4096)
def _run_table(shape: tuple[int, ...], sharding=None) -> tuple:
  """Every piece of the whole array (all processes; sharding None: a host
  array), in offset order: (offset, length, shard bounds, local index) in
  elements."""
  if sharding is None:
    distinct = {tuple((0, n) for n in shape)}
  else:
    indices = sharding.devices_indices_map(shape).values()
    distinct = {_bounds(i, shape) for i in indices}
  runs = [(off, n, b, loc) for b in distinct for loc, off, n in _runs(b, shape)]
  return tuple(sorted(runs))


# ----------------------------------------------------------------------------
# Checksums, and the verdict on a restore.
# ----------------------------------------------------------------------------
def _local_crcs(leaves, tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """This process's CRC of each piece it holds (one copy of each), whether
  it holds it, and whether each array's pieces here are finite."""
  num_pieces = sum(len(t) for t in tables)
  crcs = np.zeros(num_pieces, np.uint32)
  held = np.zeros(num_pieces, np.uint32)
  finite = np.ones(len(leaves), np.uint32)
  pos = 0
  for i, (x, table) in enumerate(zip(leaves, tables, strict=True)):
    pieces = {b: np.asarray(d) for b, d in _pieces(x).items()}
    if jnp.issubdtype(x.dtype, jnp.inexact):
      # min and max propagate NaN, and are +-Inf if any element is.
      for data in pieces.values():
        if data.size and not np.isfinite([data.min(), data.max()]).all():
          finite[i] = 0
    for j, (_, _, bounds, local) in enumerate(table):
      if bounds in pieces:
        piece = np.ascontiguousarray(pieces[bounds][local])
        crcs[pos + j] = google_crc32c.value(piece.reshape(-1).view(np.uint8))
        held[pos + j] = 1
    pos += len(table)
  return crcs, held, finite


def _over_processes(*vectors: np.ndarray) -> list[np.ndarray]:
  """Each uint32 vector as (processes, n): every process's copy."""
  if jax.process_count() == 1:
    return [v[None] for v in vectors]
  flat = multihost_utils.process_allgather(np.concatenate(vectors))
  flat = np.asarray(flat).reshape(jax.process_count(), -1)
  return np.split(flat, np.cumsum([len(v) for v in vectors])[:-1], axis=1)


def _whole_crc(table, crcs, held, itemsize: int) -> int | None:
  """The CRC of a whole array from its pieces' (None: two processes hold
  different copies of a piece)."""
  crc = 0  # CRC-32C of no bytes.
  for j, (_, n, _, _) in enumerate(table):
    values = set(crcs[held[:, j] == 1, j].tolist())
    if len(values) != 1:
      return None
    crc = crc32c_combine(crc, values.pop(), n * itemsize)
  return crc


def integrity_summary(
  tree: Any, exchange: bool = True
) -> tuple[dict[str, str | None], list[str]]:
  """The CRC-32C of every array of `tree` and the arrays that are not finite.

  Each process reads its own shards on the host (one copy of each),
  computes the CRC-32C (Castagnoli et al., 1993: it detects every single
  flipped bit and every burst of up to 32 bits) of each contiguous piece
  and the processes exchange them (one all-gather of a few numbers per
  array), so every process gets the same result. Combining the pieces'
  CRCs gives the CRC of the whole array's row-major bytes: the same value
  for any sharding and any number of processes, and the value
  `google_crc32c.value(np.asarray(x).tobytes())` gives. Measured faster
  than a reduction on the devices (benchmarks/checkpoint_integrity.py).
  `exchange=False`: no exchange, for host arrays that each process holds
  whole and that only some processes read (e.g. params for initialization).

  Returns:
    ({name: 8 hex digits, or None if processes hold different copies},
    [names of floating arrays holding NaN or Inf]).
  """
  names = array_names(tree)
  leaves = [
    jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    else x
    for x in jax.tree_util.tree_leaves(tree)
  ]
  tables = [
    _run_table(np.shape(x), x.sharding if isinstance(x, jax.Array) else None)
    for x in leaves
  ]
  local = _local_crcs(leaves, tables)
  crcs, held, finite = (
    _over_processes(*local) if exchange else [v[None] for v in local]
  )
  checksums, pos = {}, 0
  for name, x, table in zip(names, leaves, tables, strict=True):
    span = slice(pos, pos + len(table))
    crc = _whole_crc(table, crcs[:, span], held[:, span], x.dtype.itemsize)
    checksums[name] = None if crc is None else f'{crc:08x}'
    pos += len(table)
  bad = [n for n, ok in zip(names, finite.all(axis=0), strict=True) if not ok]
  return checksums, bad


def integrity_record(checksums: Mapping[str, str]) -> dict[str, Any]:
  """What is saved with a checkpoint (JSON): the algorithm and the sums."""
  return {'algorithm': CHECKSUM_ALGORITHM, 'checksums': dict(checksums)}


def first_of(names: list[str]) -> str:
  """'name' or 'name (and N more)'."""
  more = f' (and {len(names) - 1} more)' if len(names) > 1 else ''
  return names[0] + more


def integrity_problem(
  tree: Any, record: Mapping | None, exchange: bool = True
) -> str:
  """'' if `tree` matches `record` (None: no checksums were saved) and is
  finite; else one line naming the first bad array (and how many more).
  Every process gets the same answer (see integrity_summary); `exchange`
  as there. A tree of part of a saved state (its params only) is checked
  against the checksums of those arrays' names."""
  checksums, non_finite = integrity_summary(tree, exchange)
  if record is not None:
    if record.get('algorithm') != CHECKSUM_ALGORITHM:
      return f'unknown checksum algorithm {record.get("algorithm")!r}'
    saved = record.get('checksums', {})
    differ = [n for n, c in checksums.items() if c is None]
    if differ:
      return f'processes restored different copies of {first_of(differ)}'
    missing = [n for n in checksums if n not in saved]
    if missing:
      return f'no checksum was saved for {first_of(missing)}'
    wrong = [n for n, c in checksums.items() if saved[n] != c]
    if wrong:
      return (
        f'checksum mismatch in {first_of(wrong)}: the data read differs '
        'from what was saved'
      )
  if non_finite:
    return f'{first_of(non_finite)} holds NaN or Inf'
  return ''


def read_integrity_record(step_folder) -> dict | None:
  """The checksums saved in a step folder (None: saved without them)."""
  folder = paths.resolve(str(step_folder)) / INTEGRITY_ITEM
  if not folder.exists():
    return None
  return ocp.JsonCheckpointHandler().restore(
    folder, args=ocp.args.JsonRestore()
  )
