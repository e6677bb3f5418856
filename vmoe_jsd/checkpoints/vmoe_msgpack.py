"""The msgpack encoding of V-MoE's checkpoint files (see vmoe_format.py).

Custom objects are msgpack ext types whose payload is itself msgpack:
1 ndarray `(shape, dtype_name, raw_bytes)`; 2 complex `(real, imag)`;
3 numpy scalar (as 1); 4 ShapedArray `(shape, dtype_name, weak_type, {})`;
5 Slice `(start, stop, step)`; 6 SliceNd `(bin(Slice payload), ...)`;
7 SliceNdArray `(shape, (bin(SliceNd payload), ...))`; 8 IndexInfo
`(bin(ShapedArray payload), (bin(SliceNd payload), ...), (shard, ...))`.
Inside ext payloads nested objects are stored as raw bytes, not as ext.
"""

from typing import Any, NamedTuple

import ml_dtypes
import msgpack
import numpy as np

from vmoe_jsd import paths

# Marker key that identifies the map of array chunks in a data shard.
ARRAY_CHUNKS_KEY = '__msgpack_array_chunk_a87ca2__'
# vmoe (through flax) cuts every flattened chunk into pieces of at most this
# many bytes, which keeps each msgpack bin below its 4 GiB limit.
MAX_SUBCHUNK_BYTES = 2**30

EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3
EXT_SHAPED_ARRAY = 4
EXT_SLICE = 5
EXT_SLICE_ND = 6
EXT_SLICE_ND_ARRAY = 7
EXT_INDEX_INFO = 8

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


class Chunk(NamedTuple):
  """An ndarray as stored in a data shard, not yet checked or copied."""

  shape: Any
  dtype_name: Any
  buffer: Any


def dtype_from_name(name: str | bytes) -> np.dtype:
  if isinstance(name, bytes):
    name = name.decode('ascii')
  try:
    return np.dtype(name)
  except TypeError:
    # bfloat16, float8_* and int4 are not numpy builtins.
    if not hasattr(ml_dtypes, name):
      raise ValueError(f'Unknown dtype {name!r}.') from None
    return np.dtype(getattr(ml_dtypes, name))


def ndarray_ext(x: np.ndarray) -> msgpack.ExtType:
  payload = msgpack.packb((x.shape, x.dtype.name, x.tobytes('C')))
  return msgpack.ExtType(EXT_NDARRAY, payload)


def _pack_slice_nd(slice_nd: SliceNd) -> bytes:
  return msgpack.packb(tuple(msgpack.packb(s) for s in slice_nd))


def slice_nd_ext(slice_nd: SliceNd) -> msgpack.ExtType:
  return msgpack.ExtType(EXT_SLICE_ND, _pack_slice_nd(slice_nd))


def index_info_ext(info: IndexInfo) -> msgpack.ExtType:
  shaped = msgpack.packb((info.shape, info.dtype.name, info.weak_type, {}))
  slices = tuple(_pack_slice_nd(s) for s in info.global_slices)
  payload = msgpack.packb((shaped, slices, tuple(info.shards)))
  return msgpack.ExtType(EXT_INDEX_INFO, payload)


def _unpack_slice(data: bytes) -> tuple[Any, Any, Any]:
  start, stop, step = msgpack.unpackb(data, raw=True)
  return (start, stop, step)


def _unpack_slice_nd(data: bytes) -> SliceNd:
  return tuple(_unpack_slice(s) for s in msgpack.unpackb(data, raw=True))


def _unpack_shaped_array(data: bytes) -> tuple[tuple[int, ...], np.dtype, bool]:
  shape, dtype_name, weak_type, _ = msgpack.unpackb(data, raw=True)
  return tuple(shape), dtype_from_name(dtype_name), bool(weak_type)


def ext_hook(code: int, data: bytes) -> Any:
  """Decodes vmoe's ext types; ndarrays are checked later, by their user."""
  if code in (EXT_NDARRAY, EXT_NPSCALAR):
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    if code == EXT_NDARRAY:
      return Chunk(tuple(shape), dtype_name, buffer)
    dtype = dtype_from_name(dtype_name)
    return np.frombuffer(buffer, dtype=dtype).reshape(tuple(shape))[()]
  if code == EXT_COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  if code == EXT_SHAPED_ARRAY:
    return _unpack_shaped_array(data)
  if code == EXT_SLICE:
    return _unpack_slice(data)
  if code == EXT_SLICE_ND:
    return _unpack_slice_nd(data)
  if code == EXT_SLICE_ND_ARRAY:
    shape, slices = msgpack.unpackb(data, raw=True)
    items = np.empty(len(slices), dtype=object)
    items[:] = [_unpack_slice_nd(s) for s in slices]
    return items.reshape(shape)
  if code == EXT_INDEX_INFO:
    shaped, slices, shards = msgpack.unpackb(data, raw=True)
    slices = tuple(_unpack_slice_nd(s) for s in slices)
    return IndexInfo(*_unpack_shaped_array(shaped), slices, tuple(shards))
  return msgpack.ExtType(code, data)


# Errors that msgpack or the ext hook raise on truncated or garbled bytes.
_DECODE_ERRORS = (
  ValueError,
  TypeError,
  KeyError,
  IndexError,
  msgpack.UnpackException,
)


def corrupt(what: str, path: str, reason: str, name=None) -> ValueError:
  """The error for a bad vmoe `what` ('index' or 'data shard') at `path`."""
  where = '' if name is None else f' (parameter {name!r})'
  return ValueError(
    f'vmoe checkpoint {what} {path!r} is truncated or corrupt: {reason}{where}.'
  )


def unpack_file(path: str, what: str) -> Any:
  """The decoded content of a vmoe index (`what`='index') or data shard."""
  data = paths.read_bytes(path)
  try:
    return msgpack.unpackb(data, ext_hook=ext_hook, raw=False)
  except _DECODE_ERRORS as e:
    reason = f'msgpack decoding failed ({type(e).__name__}: {e})'
    raise corrupt(what, path, reason) from e
