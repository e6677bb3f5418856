"""Reads and writes V-MoE's partitioned checkpoints, and compares trees.

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
- Custom objects are msgpack ext types whose payload is itself msgpack:
  1 ndarray `(shape, dtype_name, raw_bytes)`; 2 complex `(real, imag)`;
  3 numpy scalar (as 1); 4 ShapedArray `(shape, dtype_name, weak_type, {})`;
  5 Slice `(start, stop, step)`; 6 SliceNd `(bin(Slice payload), ...)`;
  7 SliceNdArray `(shape, (bin(SliceNd payload), ...))`; 8 IndexInfo
  `(bin(ShapedArray payload), (bin(SliceNd payload), ...), (shard, ...))`.
  Inside ext payloads nested objects are stored as raw bytes, not as ext.
"""

import collections
import collections.abc
import errno
import itertools
import os
from typing import Any, NamedTuple

import ml_dtypes
import msgpack
import numpy as np

from vmoe_jsd import paths

VERSION = '20220622'

# Marker key that identifies the map of array chunks in a data shard.
_ARRAY_CHUNKS_KEY = '__msgpack_array_chunk_a87ca2__'
# vmoe (through flax) cuts every flattened chunk into pieces of at most this
# many bytes, which keeps each msgpack bin below its 4 GiB limit.
_MAX_SUBCHUNK_BYTES = 2**30

_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_EXT_SHAPED_ARRAY = 4
_EXT_SLICE = 5
_EXT_SLICE_ND = 6
_EXT_SLICE_ND_ARRAY = 7
_EXT_INDEX_INFO = 8

# A Slice is (start, stop, step); a SliceNd is a tuple of Slices.
SliceNd = tuple[tuple[Any, Any, Any], ...]


class IndexInfo(NamedTuple):
  """Metadata of one array in a vmoe index.

  Attributes:
    shape: Global shape of the array.
    dtype: Numpy dtype of the array.
    weak_type: JAX weak-type flag of the array (False for parameters).
    global_slices: The slice of the global array held by each chunk.
    shards: The data shard that holds each chunk, parallel to global_slices.
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  weak_type: bool
  global_slices: tuple[SliceNd, ...]
  shards: tuple[int, ...]


class _Chunk(NamedTuple):
  """An ndarray as stored in a data shard, not yet checked or copied."""

  shape: Any
  dtype_name: Any
  buffer: Any


# ---------------------------------------------------------------------------
# Tree helpers.
# ---------------------------------------------------------------------------


def flatten_tree(tree: Any, sep: str = '/') -> dict[str, Any]:
  """Flattens a nested mapping into a dict of `sep`-joined names.

  Empty sub-mappings have no leaves and disappear.

  Args:
    tree: Nested mappings (dict, FrozenDict, ...) with any leaves.
    sep: Separator placed between the keys of nested levels.

  Returns:
    A dict from names such as 'Encoder/encoder_norm/bias' to the leaves, in
    depth-first order.

  Raises:
    ValueError: if a key contains `sep` or is empty, since its name would not
      unflatten back to the same tree.
  """
  flat = {}

  def visit(node: Any, path: tuple[str, ...]) -> None:
    if isinstance(node, collections.abc.Mapping):
      for key, value in node.items():
        key = str(key)
        if not key or sep in key:
          raise ValueError(
            f'Key {key!r} under {sep.join(path) or "the root"!r} is empty '
            f'or contains the separator {sep!r}.'
          )
        visit(value, path + (key,))
    else:
      flat[sep.join(path)] = node

  if not isinstance(tree, collections.abc.Mapping):
    raise ValueError(f'Expected a mapping, got {type(tree).__name__}.')
  visit(tree, ())
  return flat


def unflatten_tree(flat: collections.abc.Mapping, sep: str = '/') -> dict:
  """Builds a nested dict from a dict of `sep`-joined names.

  Args:
    flat: Mapping from names such as 'Encoder/encoder_norm/bias' to leaves.
    sep: Separator between the keys of nested levels.

  Returns:
    The nested dict, with keys in the order they first appear in `flat`.

  Raises:
    ValueError: if a name has an empty component, or is both a leaf and the
      prefix of another name.
  """
  tree = {}
  for name, value in flat.items():
    keys = name.split(sep)
    if not all(keys):
      raise ValueError(f'Name {name!r} has an empty component.')
    node = tree
    for depth, key in enumerate(keys[:-1]):
      child = node.setdefault(key, {})
      if not isinstance(child, dict):
        prefix = sep.join(keys[: depth + 1])
        raise ValueError(
          f'Name {name!r} nests under {prefix!r}, which is a leaf.'
        )
      node = child
    if keys[-1] in node:
      raise ValueError(f'Name {name!r} is both a leaf and a subtree.')
    node[keys[-1]] = value
  return tree


def read_npz_tree(path: str) -> dict:
  """Reads an .npz file with '/'-joined names as a nested dict.

  This covers params.npz-style exports and the big_vision /
  vision_transformer ViT checkpoints (names such as
  'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel').

  Args:
    path: Path of the .npz file.

  Returns:
    Nested dict of numpy arrays, keys sorted at every level.
  """
  with paths.resolve(path).open('rb') as f:
    with np.load(f, allow_pickle=False) as npz:
      flat = {name: npz[name] for name in sorted(npz.files)}
  return unflatten_tree(flat, sep='/')


def match_tree(expected: Any, loaded: Any, *, what: str = 'checkpoint') -> None:
  """Checks that two trees have the same names and shapes.

  Args:
    expected: Nested mapping whose leaves have a `.shape` (arrays,
      jax.ShapeDtypeStruct, ...), e.g. the parameters a model expects.
    loaded: Nested mapping of arrays, e.g. read from a checkpoint.
    what: What `loaded` is, used in the error message.

  Raises:
    ValueError: if they differ; the message lists, each sorted, the names
      missing from `loaded`, the unexpected names in `loaded`, and the shape
      mismatches.
  """
  flat_expected = flatten_tree(expected)
  flat_loaded = flatten_tree(loaded)
  missing = sorted(set(flat_expected) - set(flat_loaded))
  unexpected = sorted(set(flat_loaded) - set(flat_expected))
  mismatched = []
  for name in sorted(set(flat_expected) & set(flat_loaded)):
    shape_expected = _shape(flat_expected[name])
    shape_loaded = _shape(flat_loaded[name])
    if shape_expected != shape_loaded:
      mismatched.append(
        f'{name}: expected {shape_expected}, got {shape_loaded}'
      )
  if not (missing or unexpected or mismatched):
    return

  def section(title: str, lines: list[str]) -> str:
    body = ''.join(f'\n    {line}' for line in lines) or '\n    (none)'
    return f'\n  {title} ({len(lines)}):{body}'

  raise ValueError(
    f'The {what} does not match the expected tree:'
    + section(f'missing from the {what}', missing)
    + section(f'unexpected in the {what}', unexpected)
    + section('shape mismatches', mismatched)
  )


def _shape(x: Any) -> tuple[int, ...]:
  # IndexInfo is a tuple, so np.shape would give its length: ask .shape first.
  shape = getattr(x, 'shape', None)
  return tuple(np.shape(x) if shape is None else shape)


def _sorted_leaves(tree: Any, path: tuple[str, ...] = ()):
  """Yields (path, leaf) in jax's flattening order: keys sorted, depth first."""
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, collections.abc.Mapping):
      yield from _sorted_leaves(value, path + (key,))
    else:
      yield path + (key,), value


def _map_sorted(tree: Any, fn) -> dict:
  """Returns a copy of a nested dict, keys sorted, with leaves `fn(leaf)`."""
  out = {}
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, collections.abc.Mapping):
      out[key] = _map_sorted(value, fn)
    else:
      out[key] = fn(value)
  return out


# ---------------------------------------------------------------------------
# Encoding and decoding of vmoe's ext types.
# ---------------------------------------------------------------------------


def _dtype_from_name(name: str | bytes) -> np.dtype:
  if isinstance(name, bytes):
    name = name.decode('ascii')
  try:
    return np.dtype(name)
  except TypeError:
    # bfloat16, float8_* and int4 are not numpy builtins.
    if not hasattr(ml_dtypes, name):
      raise ValueError(f'Unknown dtype {name!r}.') from None
    return np.dtype(getattr(ml_dtypes, name))


def _pack_ndarray(x: np.ndarray) -> bytes:
  return msgpack.packb((x.shape, x.dtype.name, x.tobytes('C')))


def _pack_slice_nd(slice_nd: SliceNd) -> bytes:
  return msgpack.packb(tuple(msgpack.packb(s) for s in slice_nd))


def _pack_index_info(info: IndexInfo) -> bytes:
  shaped = msgpack.packb((info.shape, info.dtype.name, info.weak_type, {}))
  slices = tuple(_pack_slice_nd(s) for s in info.global_slices)
  return msgpack.packb((shaped, slices, tuple(info.shards)))


def _unpack_slice(data: bytes) -> tuple[Any, Any, Any]:
  start, stop, step = msgpack.unpackb(data, raw=True)
  return (start, stop, step)


def _unpack_slice_nd(data: bytes) -> SliceNd:
  return tuple(_unpack_slice(s) for s in msgpack.unpackb(data, raw=True))


def _unpack_shaped_array(data: bytes) -> tuple[tuple[int, ...], np.dtype, bool]:
  shape, dtype_name, weak_type, _ = msgpack.unpackb(data, raw=True)
  return tuple(shape), _dtype_from_name(dtype_name), bool(weak_type)


def _unpack_index_info(data: bytes) -> IndexInfo:
  shaped, slices, shards = msgpack.unpackb(data, raw=True)
  shape, dtype, weak_type = _unpack_shaped_array(shaped)
  return IndexInfo(
    shape=shape,
    dtype=dtype,
    weak_type=weak_type,
    global_slices=tuple(_unpack_slice_nd(s) for s in slices),
    shards=tuple(shards),
  )


def _ndarray_from_chunk(chunk: _Chunk) -> np.ndarray:
  dtype = _dtype_from_name(chunk.dtype_name)
  return np.frombuffer(chunk.buffer, dtype=dtype).reshape(chunk.shape)


def _ext_hook(code: int, data: bytes) -> Any:
  """Decodes vmoe's ext types; ndarrays are checked later, by their user."""
  if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    chunk = _Chunk(tuple(shape), dtype_name, buffer)
    return chunk if code == _EXT_NDARRAY else _ndarray_from_chunk(chunk)[()]
  if code == _EXT_COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  if code == _EXT_SHAPED_ARRAY:
    return _unpack_shaped_array(data)
  if code == _EXT_SLICE:
    return _unpack_slice(data)
  if code == _EXT_SLICE_ND:
    return _unpack_slice_nd(data)
  if code == _EXT_SLICE_ND_ARRAY:
    shape, slices = msgpack.unpackb(data, raw=True)
    items = np.empty(len(slices), dtype=object)
    items[:] = [_unpack_slice_nd(s) for s in slices]
    return items.reshape(shape)
  if code == _EXT_INDEX_INFO:
    return _unpack_index_info(data)
  return msgpack.ExtType(code, data)


# Errors that msgpack or the ext hook raise on truncated or garbled bytes.
_DECODE_ERRORS = (
  ValueError,
  TypeError,
  KeyError,
  IndexError,
  msgpack.UnpackException,
)


def _unpack_file(path: str, what: str) -> Any:
  data = paths.read_bytes(path)
  try:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False)
  except _DECODE_ERRORS as e:
    raise ValueError(
      f'vmoe checkpoint {what} {path!r} is truncated or corrupt: '
      f'msgpack decoding failed ({type(e).__name__}: {e}).'
    ) from e


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


def shard_path(prefix: str, shard: int, shard_count: int) -> str:
  """Returns the path of data shard `shard` of `shard_count`, as vmoe names it.

  Args:
    prefix: Checkpoint prefix (path without '.index').
    shard: Shard number, from 0.
    shard_count: Number of shards.

  Returns:
    E.g. '/ckpt/checkpoint.data-00000-of-00001'.
  """
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

  def corrupt(reason: str) -> ValueError:
    return ValueError(
      f'vmoe checkpoint index {path!r} is corrupt: {reason} '
      f'(parameter {name!r}).'
    )

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
  corner weights cancel, as it covers nothing.

  Args:
    bounds: one ((start, stop), ...) per box, 0 <= start <= stop <= size.
    shape: the array's shape.

  Returns:
    True for an exact tiling.
  """
  weights: dict[tuple[int, ...], int] = collections.defaultdict(int)
  for box in bounds:
    if any(a == b for a, b in box):
      continue  # empty: its corners cancel
    for corner in itertools.product(*((a, b) for a, b in box)):
      stops = sum(c == b for c, (_, b) in zip(corner, box, strict=True))
      weights[corner] += -1 if stops % 2 else 1
  whole = {}
  for corner in itertools.product(*((0, n) for n in shape)):
    stops = sum(c == n for c, n in zip(corner, shape, strict=True))
    whole[corner] = -1 if stops % 2 else 1
  if any(n == 0 for n in shape):
    whole = {}  # an empty array: no box may cover anything
  return {c: w for c, w in weights.items() if w} == whole


def _strip_index_suffix(prefix: str) -> str:
  return prefix[: -len('.index')] if prefix.endswith('.index') else prefix


def read_vmoe_index(prefix: str) -> dict[str, Any]:
  """Reads and checks the index of a vmoe partitioned checkpoint.

  The index alone gives every parameter's shape and dtype, so a checkpoint
  can be checked with `match_tree` before any data is read.

  Args:
    prefix: Checkpoint prefix, or the path of its '.index' file.

  Returns:
    A dict with 'shard_count' (int), 'version' (str, or None for checkpoints
    older than versioning) and 'index' (nested dict with IndexInfo leaves).

  Raises:
    FileNotFoundError: if the index file is missing.
    ValueError: if the index is truncated or corrupt, its version unknown, or
      the slices of an array do not tile it.
  """
  index_path = _strip_index_suffix(prefix) + '.index'
  if not paths.exists(index_path):
    raise FileNotFoundError(
      errno.ENOENT, 'vmoe checkpoint index not found', index_path
    )
  content = _unpack_file(index_path, 'index')
  if not isinstance(content, dict) or not {'index', 'shard_count'} <= set(
    content
  ):
    raise ValueError(
      f'vmoe checkpoint index {index_path!r} is corrupt: expected a map with '
      "keys 'index' and 'shard_count'."
    )
  version = content.get('version')
  if version not in (None, VERSION):
    raise ValueError(
      f'vmoe checkpoint index {index_path!r} has version {version!r}; only '
      f'{VERSION!r} (and older, unversioned files) can be read.'
    )
  shard_count = content['shard_count']
  index = content['index']
  if not isinstance(shard_count, int) or shard_count < 1:
    raise ValueError(
      f'vmoe checkpoint index {index_path!r} is corrupt: shard_count='
      f'{shard_count!r}.'
    )
  if not isinstance(index, dict):
    raise ValueError(
      f'vmoe checkpoint index {index_path!r} is corrupt: its tree is a '
      f'{type(index).__name__}, not a map.'
    )
  for path, info in _sorted_leaves(index):
    _check_index_leaf('/'.join(path), info, shard_count, index_path)
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
    FileNotFoundError: if the index, or a data shard that it refers to, is
      missing; the message names the file.
    ValueError: if the index or a shard is truncated or corrupt (msgpack fails,
      a slice's bytes do not match its shape and dtype, the slices do not cover
      an array); the message names the file and, where known, the parameter.
  """
  prefix = _strip_index_suffix(prefix)
  index_path = prefix + '.index'
  content = read_vmoe_index(prefix)
  shard_count, index = content['shard_count'], content['index']

  # Leaf i of the sorted flattening is the key str(i) in the data shards.
  names, infos = [], []
  for path, info in _sorted_leaves(index):
    names.append('/'.join(path))
    infos.append(info)
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
    chunks = _unpack_file(path, 'data shard')
    _fill_from_shard(path, shard, chunks, names, infos, arrays, pending)
    del chunks

  if pending:
    (i, bounds), shard = next(iter(pending.items()))
    raise ValueError(
      f'vmoe checkpoint data shard {shard_path(prefix, shard, shard_count)!r}'
      f' is truncated or corrupt: it lacks the slice {bounds} of parameter '
      f'{names[i]!r} ({len(pending)} slices missing in all).'
    )
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
    where = '' if i is None else f' (parameter {names[i]!r})'
    return ValueError(
      f'vmoe checkpoint data shard {path!r} is truncated or corrupt: '
      f'{reason}{where}.'
    )

  if not isinstance(chunks, dict) or _ARRAY_CHUNKS_KEY not in chunks:
    raise corrupt('it is not a map of array chunks')
  for key, entries in chunks.items():
    if key == _ARRAY_CHUNKS_KEY:
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
        and all(isinstance(sub, _Chunk) for sub in subchunks)
      ):
        raise corrupt('expected a list of ndarray subchunks', i)
      pieces = []
      for sub in subchunks:
        try:
          dtype = _dtype_from_name(sub.dtype_name)
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


def _write_shard(f, leaf_ids: list[int], arrays: list[np.ndarray]) -> None:
  """Streams one data shard: the same bytes as packing the whole map."""
  packer = msgpack.Packer()
  f.write(packer.pack_map_header(1 + len(leaf_ids)))
  f.write(packer.pack(_ARRAY_CHUNKS_KEY))
  f.write(packer.pack(True))
  for i in leaf_ids:
    flat = np.ravel(arrays[i], order='C')
    step = max(1, _MAX_SUBCHUNK_BYTES // flat.dtype.itemsize)
    subchunks = [
      msgpack.ExtType(_EXT_NDARRAY, _pack_ndarray(flat[j : j + step]))
      for j in range(0, flat.size, step)
    ]
    whole = tuple((0, size, None) for size in arrays[i].shape)
    slice_ext = msgpack.ExtType(_EXT_SLICE_ND, _pack_slice_nd(whole))
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
  prefix = _strip_index_suffix(prefix)
  tree = _map_keys_to_str(tree)
  names, arrays, infos = [], [], []
  bytes_per_shard = [0] * num_shards
  for path, leaf in _sorted_leaves(tree):
    name = '/'.join(path)
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
    names.append(name)
    arrays.append(array)

  paths.makedirs(paths.resolve(prefix).parent)
  shard_paths = []
  for shard in range(num_shards):
    leaf_ids = [i for i, info in enumerate(infos) if info.shards[0] == shard]
    path = shard_path(prefix, shard, num_shards)
    _write_atomically(
      path, lambda f, ids=leaf_ids: _write_shard(f, ids, arrays)
    )
    shard_paths.append(path)

  exts = iter(
    msgpack.ExtType(_EXT_INDEX_INFO, _pack_index_info(info)) for info in infos
  )
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
