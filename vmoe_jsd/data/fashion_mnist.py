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

import numpy as np

from vmoe_jsd.data.arrays import ArrayDataset

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


def read_idx(path: str) -> np.ndarray:
  """Reads a (possibly gzipped) IDX file into a numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f'{path} is not an IDX file (bad magic {data[:4]!r})')
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f'{path}: unknown IDX type code {type_code:#x}')
  header = 4 + 4 * ndim
  shape = tuple(
    int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)
  )
  dtype = np.dtype(_IDX_DTYPES[type_code])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
      f'{path} is truncated or corrupt: header says shape {shape} '
      f'({expected} bytes) but {len(data) - header} bytes follow'
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape)


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
  images = read_idx(paths[0])[..., None]
  labels = read_idx(paths[1]).astype(np.int32)
  return ArrayDataset(
    images[sl], labels[sl], num_classes=10, name=f'fashion_mnist:{split}'
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
