"""Reads and writes V-MoE's partitioned checkpoints.

V-MoE (Riquelme et al., 2021, "Scaling Vision with Sparse Mixture of
Experts") stores parameters in its own format (google-research/vmoe,
`vmoe/checkpoints/partitioned.py`, version '20220622'). This module reads and
writes that format with plain msgpack and numpy, so that checkpoints of the
original code can be imported, and ours exported, without vmoe installed.

The format, as this module understands it:

- `PREFIX.index` is one msgpack map `{'shard_count': int, 'index': tree,
  'version': '20220622'}` (keys in that order). `tree` is the nested state dict
  of the saved tree with sorted string keys; each leaf is an IndexInfo.
- `PREFIX.data-%05d-of-%05d` (one per shard) is a msgpack map whose first key
  is the marker `'__msgpack_array_chunk_a87ca2__'` (value True). Every other
  key is `str(i)`, with `i` the leaf's position in the sorted depth-first
  order of the index tree, and maps to a list of `[subchunks, global_slice]`
  pairs: `global_slice` is the SliceNd of the array held there and
  `subchunks` the C-order flattened values of that slice, cut into 1-D
  pieces of at most 2**30 bytes.
- The ext types of the objects inside are in vmoe_msgpack.py.
"""

import collections
import collections.abc
import errno
import functools
import itertools
import os
from typing import Any

import msgpack
import numpy as np

from vmoe_jsd import paths
from vmoe_jsd.checkpoints import vmoe_msgpack
from vmoe_jsd.checkpoints.vmoe_msgpack import (
  ARRAY_CHUNKS_KEY,
  Chunk,
  IndexInfo,
  SliceNd,
)

VERSION = '20220622'


def _sorted_leaves(tree: Any, path: tuple[str, ...] = ()):
  """Yields ('/'-joined name, leaf) in jax's flattening order: keys sorted,
  depth first."""
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, collections.abc.Mapping):
      yield from _sorted_leaves(value, path + (key,))
    else:
      yield '/'.join(path + (key,)), value


def _map_sorted(tree: Any, fn) -> dict:
  """A copy of a nested dict, keys sorted, with leaves `fn(leaf)`."""
  return {
    key: _map_sorted(tree[key], fn)
    if isinstance(tree[key], collections.abc.Mapping)
    else fn(tree[key])
    for key in sorted(tree)
  }


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------
def shard_path(prefix: str, shard: int, shard_count: int) -> str:
  """'PREFIX.data-00000-of-00001': data shard `shard` (from 0), as vmoe."""
  return f'{prefix}.data-{shard:05d}-of-{shard_count:05d}'


def _bounds(slice_nd: SliceNd, shape: tuple[int, ...]) -> tuple:
  """Returns ((start, stop), ...) of a SliceNd with None made explicit."""
  if len(slice_nd) != len(shape):
    raise ValueError(f'slice {slice_nd} has the wrong rank for {shape}')
  bounds = []
  for (start, stop, step), size in zip(slice_nd, shape, strict=True):
    start = 0 if start is None else start
    stop = size if stop is None else stop
    if step not in (None, 1) or not 0 <= start <= stop <= size:
      raise ValueError(f'slice {slice_nd} does not fit in shape {shape}')
    bounds.append((start, stop))
  return tuple(bounds)


def _check_index_leaf(name: str, info: Any, shard_count: int, path: str):
  """Checks that an index entry is an IndexInfo whose slices tile its array."""
  corrupt = functools.partial(vmoe_msgpack.corrupt, 'index', path, name=name)
  if not isinstance(info, IndexInfo):
    raise corrupt(f'expected an IndexInfo, got {type(info).__name__}')
  if len(info.global_slices) != len(info.shards):
    raise corrupt('it has a different number of slices and shards')
  if not all(isinstance(s, int) and 0 <= s < shard_count for s in info.shards):
    raise corrupt(f'shards {info.shards} are not all in [0, {shard_count})')
  try:
    bounds = [_bounds(s, info.shape) for s in info.global_slices]
  except (TypeError, ValueError) as e:
    raise corrupt(str(e)) from None
  if not boxes_tile(bounds, info.shape):
    raise corrupt(f'its slices do not tile the shape {info.shape}')


def boxes_tile(bounds, shape: tuple[int, ...]) -> bool:
  """Whether boxes ((start, stop), ...) inside `shape` cover each of its
  elements exactly once (disjoint, and their volumes sum to its volume).

  The mixed finite difference of a box's indicator function is +-1 at its
  2^d corners (sign (-1)^(number of stops)), and the difference operator is
  invertible on functions of bounded support (its inverse is the prefix sum
  along every axis). So sum_b 1_b = 1_shape, i.e. an exact tiling, holds iff
  the signed corner counts of the boxes add up to those of the whole array:
  O(n 2^d) dictionary updates for n boxes of rank d, instead of the O(n^2)
  pairwise overlap test (8,000 slices: 24.5 s). An empty box has all its
  corner weights cancel, as it covers nothing. Each box must have
  0 <= start <= stop <= size on every axis.
  """
  weights: dict[tuple[int, ...], int] = collections.defaultdict(int)
  for box in bounds:
    if all(a < b for a, b in box):  # an empty box: its corners cancel
      for corner, sign in _signed_corners(box):
        weights[corner] += sign
  whole = dict(_signed_corners(tuple((0, n) for n in shape)))
  if any(n == 0 for n in shape):
    whole = {}  # an empty array: no box may cover anything
  return {c: w for c, w in weights.items() if w} == whole


def _signed_corners(box):
  """(corner, (-1)^(number of its stops)) of a box ((start, stop), ...)."""
  for corner in itertools.product(*box):
    stops = sum(c == b for c, (_, b) in zip(corner, box, strict=True))
    yield corner, -1 if stops % 2 else 1


def read_vmoe_index(prefix: str) -> dict[str, Any]:
  """Reads and checks the index of a vmoe partitioned checkpoint.

  The index alone gives every parameter's shape and dtype, so a checkpoint
  can be checked with `match_tree` before any data is read. `prefix` as for
  `read_vmoe_checkpoint`.

  Returns:
    A dict with 'shard_count' (int), 'version' (str, or None for checkpoints
    older than versioning) and 'index' (nested dict with IndexInfo leaves).

  Raises:
    FileNotFoundError: if the index file is missing.
    ValueError: if the index is truncated or corrupt, its version unknown, or
      the slices of an array do not tile it.
  """
  index_path = prefix.removesuffix('.index') + '.index'
  if not paths.exists(index_path):
    raise FileNotFoundError(
      errno.ENOENT, 'vmoe checkpoint index not found', index_path
    )
  content = vmoe_msgpack.unpack_file(index_path, 'index')
  corrupt = functools.partial(vmoe_msgpack.corrupt, 'index', index_path)
  if not isinstance(content, dict) or {'index', 'shard_count'} - set(content):
    raise corrupt("expected a map with keys 'index' and 'shard_count'")
  version = content.get('version')
  if version not in (None, VERSION):
    raise ValueError(
      f'vmoe checkpoint index {index_path!r} has version {version!r}; only '
      f'{VERSION!r} (and older, unversioned files) can be read.'
    )
  shard_count, index = content['shard_count'], content['index']
  if not isinstance(shard_count, int) or shard_count < 1:
    raise corrupt(f'shard_count={shard_count!r}')
  if not isinstance(index, dict):
    raise corrupt(f'its tree is a {type(index).__name__}, not a map')
  for name, info in _sorted_leaves(index):
    _check_index_leaf(name, info, shard_count, index_path)
  return {'shard_count': shard_count, 'version': version, 'index': index}


def read_vmoe_checkpoint(prefix: str) -> dict:
  """Reads a vmoe partitioned checkpoint into a nested dict of numpy arrays.

  Args:
    prefix: Checkpoint prefix, e.g. '/ckpt/checkpoint' for the files
      '/ckpt/checkpoint.index' and '/ckpt/checkpoint.data-00000-of-00001'.
      The path of the '.index' file is accepted too.

  Returns:
    The nested dict stored in the checkpoint (string keys, sorted), with each
    leaf the full global array assembled from all its slices in all shards.

  Raises:
    FileNotFoundError: the index, or a data shard it lists, is missing.
    ValueError: the index or a shard is truncated or corrupt (its bytes do
      not decode or fit, the slices do not cover an array); the message
      names the file and, where known, the parameter.
  """
  prefix = prefix.removesuffix('.index')
  index_path = prefix + '.index'
  content = read_vmoe_index(prefix)
  shard_count, index = content['shard_count'], content['index']

  # Leaf i of the sorted flattening is the key str(i) in the data shards.
  entries = list(_sorted_leaves(index))
  names = [name for name, _ in entries]
  infos = [info for _, info in entries]
  arrays = [np.empty(info.shape, info.dtype) for info in infos]
  # (leaf, slice bounds) -> shard, for every slice still to be read.
  pending = {}
  for i, info in enumerate(infos):
    for slice_nd, shard in zip(info.global_slices, info.shards, strict=True):
      pending[(i, _bounds(slice_nd, info.shape))] = shard

  for shard in sorted(set(pending.values())):
    path = shard_path(prefix, shard, shard_count)
    if not paths.exists(path):
      first = min(i for (i, _), s in pending.items() if s == shard)
      raise FileNotFoundError(
        errno.ENOENT,
        f'vmoe checkpoint data shard not found (it holds {names[first]!r}, '
        f'listed in {index_path!r})',
        path,
      )
    chunks = vmoe_msgpack.unpack_file(path, 'data shard')
    _fill_from_shard(path, shard, chunks, names, infos, arrays, pending)
    del chunks

  if pending:
    (i, bounds), shard = next(iter(pending.items()))
    path = shard_path(prefix, shard, shard_count)
    reason = f'it lacks the slice {bounds} ({len(pending)} missing in all)'
    raise vmoe_msgpack.corrupt('data shard', path, reason, names[i])
  leaves = iter(arrays)
  return _map_sorted(index, lambda _: next(leaves))


def _fill_from_shard(
  path: str,
  shard: int,
  chunks: Any,
  names: list[str],
  infos: list[IndexInfo],
  arrays: list[np.ndarray],
  pending: dict,
) -> None:
  """Copies the slices held by one data shard into the global arrays."""

  def corrupt(reason: str, i: int | None = None) -> ValueError:
    name = None if i is None else names[i]
    return vmoe_msgpack.corrupt('data shard', path, reason, name)

  if not isinstance(chunks, dict) or ARRAY_CHUNKS_KEY not in chunks:
    raise corrupt('it is not a map of array chunks')
  for key, entries in chunks.items():
    if key == ARRAY_CHUNKS_KEY:
      continue
    if not (isinstance(key, str) and key.isdigit() and int(key) < len(infos)):
      raise corrupt(f'unknown array id {key!r}')
    i = int(key)
    info = infos[i]
    if not isinstance(entries, list):
      raise corrupt('expected a list of chunks', i)
    for entry in entries:
      if not (isinstance(entry, list) and len(entry) == 2):
        raise corrupt('expected [subchunks, global_slice] pairs', i)
      subchunks, slice_nd = entry
      try:
        bounds = _bounds(slice_nd, info.shape)
      except (TypeError, ValueError) as e:
        raise corrupt(f'bad global slice ({e})', i) from None
      if pending.get((i, bounds)) != shard:
        raise corrupt(f'slice {bounds} is not listed for this shard', i)
      if not (
        isinstance(subchunks, list)
        and all(isinstance(sub, Chunk) for sub in subchunks)
      ):
        raise corrupt('expected a list of ndarray subchunks', i)
      pieces = []
      for sub in subchunks:
        try:
          dtype = vmoe_msgpack.dtype_from_name(sub.dtype_name)
        except (TypeError, ValueError) as e:
          raise corrupt(f'bad dtype ({e})', i) from None
        if dtype != info.dtype:
          raise corrupt(f'dtype {dtype} differs from {info.dtype}', i)
        if not all(isinstance(d, int) and d >= 0 for d in sub.shape):
          raise corrupt(f'a subchunk has the bad shape {sub.shape}', i)
        size = int(np.prod(sub.shape))
        if len(sub.buffer) != size * dtype.itemsize:
          raise corrupt(
            f'a subchunk has {len(sub.buffer)} bytes, its shape {sub.shape} '
            f'and dtype {dtype} need {size * dtype.itemsize}',
            i,
          )
        pieces.append(np.frombuffer(sub.buffer, dtype=dtype))
      shape = tuple(b - a for a, b in bounds)
      flat = np.concatenate(pieces) if pieces else np.empty(0, info.dtype)
      if flat.size != int(np.prod(shape)):
        raise corrupt(
          f'slice {bounds} holds {flat.size} values, not {int(np.prod(shape))}',
          i,
        )
      arrays[i][tuple(slice(a, b) for a, b in bounds)] = flat.reshape(shape)
      del pending[(i, bounds)]


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------
def _write_atomically(path: str, write_fn) -> None:
  """Writes `path` whole or not at all.

  Locally through a hidden temp file renamed onto `path`; on GCS (or any
  remote store) directly, since an object only appears once its upload has
  completed.
  """
  out = paths.resolve(path)
  if paths.is_remote(out):
    with out.open('wb') as f:
      write_fn(f)
    return
  # vmoe's own writer uses this temp name; its resume logic skips such files.
  tmp = out.parent / ('.tmp.' + out.name)
  try:
    with tmp.open('wb') as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(out)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def _write_shard(f, shard: int, arrays, infos) -> None:
  """Streams one data shard: the same bytes as packing the whole map."""
  leaf_ids = [i for i, info in enumerate(infos) if info.shards[0] == shard]
  packer = msgpack.Packer()
  f.write(packer.pack_map_header(1 + len(leaf_ids)))
  f.write(packer.pack(ARRAY_CHUNKS_KEY))
  f.write(packer.pack(True))
  for i in leaf_ids:
    flat = np.ravel(arrays[i], order='C')
    step = max(1, vmoe_msgpack.MAX_SUBCHUNK_BYTES // flat.dtype.itemsize)
    subchunks = [
      vmoe_msgpack.ndarray_ext(flat[j : j + step])
      for j in range(0, flat.size, step)
    ]
    slice_ext = vmoe_msgpack.slice_nd_ext(infos[i].global_slices[0])
    f.write(packer.pack(str(i)))
    f.write(packer.pack([[subchunks, slice_ext]]))


def write_vmoe_checkpoint(
  prefix: str, tree: collections.abc.Mapping, num_shards: int = 1
) -> list[str]:
  """Writes a nested dict of arrays as a vmoe partitioned checkpoint.

  vmoe's `restore_checkpoint` reads the result. Each array is stored whole,
  in the shard that holds the fewest bytes so far (ties: lowest number), in
  the same order vmoe uses; for arrays under vmoe's 256 MiB chunk size this
  gives the bytes vmoe itself writes. Data shards are written first and the
  index last, each through a temp file renamed into place.

  Args:
    prefix: Checkpoint prefix, e.g. '/ckpt/checkpoint' (a trailing '.index'
      is dropped). Missing directories are created.
    tree: Nested mapping with array leaves (numpy or fully addressable jax
      arrays, or anything `np.asarray` takes); keys are converted to str.
    num_shards: Number of data shards.

  Returns:
    The written paths: the index first, then the data shards in order.

  Raises:
    ValueError: if num_shards < 1 or a leaf is not a numeric array.
  """
  if not isinstance(num_shards, int) or num_shards < 1:
    raise ValueError(f'num_shards={num_shards!r} must be an integer >= 1.')
  if not isinstance(tree, collections.abc.Mapping):
    raise ValueError(f'Expected a mapping, got {type(tree).__name__}.')
  prefix = prefix.removesuffix('.index')
  tree = _map_keys_to_str(tree)
  arrays, infos = [], []
  bytes_per_shard = [0] * num_shards
  for name, leaf in _sorted_leaves(tree):
    array = np.asarray(leaf)
    if array.dtype.hasobject or array.dtype.fields is not None:
      raise ValueError(
        f'Parameter {name!r} has dtype {array.dtype}; only plain numeric '
        'arrays can be saved.'
      )
    shard = min(range(num_shards), key=lambda s: (bytes_per_shard[s], s))
    bytes_per_shard[shard] += array.nbytes
    whole = tuple((0, size, None) for size in array.shape)
    infos.append(
      IndexInfo(
        shape=tuple(array.shape),
        dtype=array.dtype,
        weak_type=bool(getattr(leaf, 'weak_type', False)),
        global_slices=(whole,),
        shards=(shard,),
      )
    )
    arrays.append(array)

  paths.makedirs(paths.resolve(prefix).parent)
  shard_paths = [shard_path(prefix, s, num_shards) for s in range(num_shards)]
  for shard, path in enumerate(shard_paths):
    _write_atomically(
      path, lambda f, s=shard: _write_shard(f, s, arrays, infos)
    )

  exts = iter(vmoe_msgpack.index_info_ext(info) for info in infos)
  content = {
    'shard_count': num_shards,
    'index': _map_sorted(tree, lambda _: next(exts)),
    'version': VERSION,
  }
  index_path = prefix + '.index'
  _write_atomically(index_path, lambda f: f.write(msgpack.packb(content)))
  return [index_path] + shard_paths


def _map_keys_to_str(tree: Any) -> Any:
  if not isinstance(tree, collections.abc.Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    if str(key) in out:
      raise ValueError(f'Keys collide once converted to str: {key!r}.')
    out[str(key)] = _map_keys_to_str(value)
  return out
