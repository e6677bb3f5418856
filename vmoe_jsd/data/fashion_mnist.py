"""Fashion-MNIST from the gzipped IDX files (the offline default dataset).

Xiao, Rasul, Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747. 60,000 training
and 10,000 test images, 28x28 grey, 10 classes, MIT licence.

Debian's package `dataset-fashion-mnist` installs the four files under
/usr/share/datasets/fashion-mnist/. The IDX format (LeCun's MNIST format):
a big-endian header (magic: two zero bytes, a type code, the number of
dimensions; then one uint32 per dimension) followed by the raw data.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from vmoe_jsd.data.arrays import ArrayDataset
from vmoe_jsd.data.indexed import DataError

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
CLASS_NAMES = (
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
)
HOW_TO_GET = (
  'Install them with `sudo apt-get install -y dataset-fashion-mnist` '
  '(Debian/Ubuntu; files land in /usr/share/datasets/fashion-mnist), or set '
  "config.dataset.<split>.name='tfds' with tfds_name='fashion_mnist' where "
  'the internet is reachable, or point config.dataset.<split>.data_dir at a '
  'folder holding the four *-ubyte.gz files.'
)

_IDX_DTYPES = {
  0x08: np.uint8,
  0x09: np.int8,
  0x0B: '>i2',
  0x0C: '>i4',
  0x0D: '>f4',
  0x0E: '>f8',
}


def _read_bytes(path: str) -> bytes:
  """The (gunzipped) bytes of `path`; DataError if it cannot be read."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      return f.read()
  except EOFError:
    raise DataError(
      f'{path} is truncated (the gzip stream ends early); copy the file again'
    ) from None
  except (gzip.BadGzipFile, zlib.error) as e:
    raise DataError(
      f'{path} is not a gzipped IDX file ({e}); expected a *-ubyte.gz file'
    ) from None
  except OSError as e:
    raise DataError(f'{path} cannot be read ({e.strerror or e})') from None


def read_idx(path: str) -> np.ndarray:
  """Reads a (possibly gzipped) IDX file into a numpy array.

  Raises:
    DataError: the file is truncated, not gzip, or not IDX (named).
  """
  data = _read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DataError(
      f'{path} is not an IDX file (bad magic {data[:4]!r}; an IDX file '
      'starts with two zero bytes, a type code and the number of dimensions)'
    )
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise DataError(
      f'{path}: unknown IDX type code {type_code:#x}; valid: '
      f'{", ".join(f"{c:#x}" for c in _IDX_DTYPES)}'
    )
  header = 4 + 4 * ndim
  shape = tuple(
    int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)
  )
  dtype = np.dtype(_IDX_DTYPES[type_code])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise DataError(
      f'{path} is truncated or corrupt: header says shape {shape} '
      f'({expected} bytes) but {max(len(data) - header, 0)} bytes follow'
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _check_pair(paths, images: np.ndarray, labels: np.ndarray) -> None:
  """DataError unless (N, H, W) images go with N labels."""
  if images.ndim != 3:
    raise DataError(
      f'{paths[0]} holds an array of shape {images.shape}, not images '
      '(N, 28, 28); is it a labels file?'
    )
  if labels.ndim != 1:
    raise DataError(
      f'{paths[1]} holds an array of shape {labels.shape}, not labels (N,)'
      '; is it an images file?'
    )
  if len(images) != len(labels):
    raise DataError(
      f'{paths[0]} holds {len(images)} images but {paths[1]} holds '
      f'{len(labels)} labels; the two files must be of the same split'
    )


def load(split: str, data_dir: str | None = None) -> ArrayDataset:
  """Loads a Fashion-MNIST split as (N, 28, 28, 1) uint8 images.

  Args:
    split: 'train' or 'test'; a slice like 'train[:1000]' or
      'train[50000:]' takes those examples.
    data_dir: folder with the IDX files (default /usr/share/datasets/...).

  Returns:
    An ArrayDataset with 10 classes.
  """
  base, sl = _parse_split(split)
  data_dir = data_dir or DEFAULT_DIR
  paths = [os.path.join(data_dir, f) for f in FILES[base]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
      f'Fashion-MNIST files not found: {missing}. {HOW_TO_GET}'
    )
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  _check_pair(paths, images, labels)
  return ArrayDataset(
    images[sl][..., None],
    labels[sl].astype(np.int32),
    num_classes=10,
    name=f'fashion_mnist:{split}',
  )


def _parse_split(split: str) -> tuple[str, slice]:
  base, _, rest = split.partition('[')
  if base not in FILES:
    raise ValueError(
      f'split={split!r} is unknown for fashion_mnist; choose one of '
      f"{sorted(FILES)}, optionally sliced like 'train[:50000]'"
    )
  if not rest:
    return base, slice(None)
  body = rest.rstrip(']')
  try:
    start, _, stop = body.partition(':')
    return base, slice(
      int(start) if start else None, int(stop) if stop else None
    )
  except ValueError:
    raise ValueError(
      f"split={split!r}: the slice must look like 'train[:50000]' or "
      "'train[50000:]'"
    ) from None
