"""Host-side datasets. One registry maps config.dataset.<split>.name to code.

Every dataset has `num_classes`, `image_shape`, `__len__`,
`train_batches(batch_size, seed=, start_step=, process_index=,
process_count=)` and `eval_batches(batch_size, process_index=,
process_count=, limit=)`, yielding uint8 images (B, H, W, C) and int32
labels. Eval batches add a boolean 'mask' for padding and the int32 'index'
of each example in the split (-1 for padding), and have the same number on
every process (global batch b holds positions [b B, (b + 1) B); see
eval_padding.py). Training batches of the canvas datasets ('tfds',
'folder') add 'orig_size': (B, 2) int32 original (height, width) of each
image before it was resized to the canvas.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from vmoe_jsd.config_errors import fail, to_dict
from vmoe_jsd.data import fashion_mnist, folder, synthetic, tfds_data


def _fashion_mnist(cfg, default_image_size):
  del default_image_size
  return fashion_mnist.load(cfg['split'], cfg.get('data_dir'))


def _synthetic(cfg, default_image_size):
  del default_image_size
  return synthetic.load(
    cfg['split'],
    num_examples=cfg.get('num_examples', 512),
    image_size=cfg.get('image_size', 16),
    channels=cfg.get('channels', 1),
    num_classes=cfg.get('num_classes', 4),
    seed=cfg.get('seed', 0),
  )


def _tfds(cfg, default_image_size):
  del default_image_size
  return tfds_data.TfdsDataset(
    cfg['tfds_name'],
    cfg['split'],
    image_size=cfg['image_size'],
    data_dir=cfg.get('data_dir'),
    resize_size=cfg.get('resize_size'),
    mini=cfg.get('mini', False),
    num_workers=cfg.get('num_workers'),
  )


def _folder(cfg, default_image_size):
  return folder.FolderDataset(
    cfg['data_dir'],
    cfg['split'],
    image_size=cfg.get('image_size') or default_image_size,
    channels=cfg.get('channels', 3),
    resize_size=cfg.get('resize_size'),
    num_workers=cfg.get('num_workers'),
  )


# name -> (block, default image size) -> dataset.
LOADERS: dict[str, Callable[[Mapping, int | None], Any]] = {
  'fashion_mnist': _fashion_mnist,
  'folder': _folder,
  'synthetic': _synthetic,
  'tfds': _tfds,
}
DATASETS = tuple(sorted(LOADERS))


def get_dataset(cfg: Mapping[str, Any], default_image_size: int | None = None):
  """Builds the dataset described by one config.dataset.<split> block.

  Args:
    cfg: the block (name, split and the dataset's own keys).
    default_image_size: image_size of a 'folder' block that sets none (the
      augmentation size).

  Returns:
    The dataset.
  """
  name = cfg['name']
  if name not in LOADERS:
    raise ValueError(
      f'dataset.name={name!r} is unknown; choose one of {sorted(DATASETS)}'
    )
  return LOADERS[name](cfg, default_image_size)


def image_shape(
  cfg: Mapping[str, Any], default_image_size: int | None = None
) -> tuple[int, int, int]:
  """(H, W, C) of a dataset block's images, without reading data (the
  canvas of 'tfds' and 'folder' blocks)."""
  name = cfg['name']
  if name == 'fashion_mnist':
    return (28, 28, 1)
  if name == 'synthetic':
    size = cfg.get('image_size', 16)
    return (size, size, cfg.get('channels', 1))
  if name == 'tfds':
    size = cfg['image_size']
    return (size, size, cfg.get('channels', 3))
  if name == 'folder':
    size = cfg.get('image_size') or default_image_size
    return (size, size, cfg.get('channels', 3))
  raise ValueError(
    f'dataset.name={name!r} is unknown; choose one of {sorted(DATASETS)}'
  )


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """One dataset block (config.dataset.<split>, or a few-shot one).

  Attributes:
    block: the block as a dict (name, split, batch_size, the dataset's keys).
    default_image_size: the image size of a block that sets none (the
      augmentation size), for loading and for `image_shape`.
  """

  block: Mapping[str, Any]
  default_image_size: int | None = None

  @classmethod
  def from_config(cls, split: str, cfg, default_image_size: int) -> SplitSpec:
    """Pure checks of config.dataset.<split> (no file is touched)."""
    spec = cls(to_dict(cfg), default_image_size)
    spec._check_keys(split)
    return spec

  @property
  def name(self) -> str:
    return self.block['name']

  @property
  def split(self) -> str:
    return self.block['split']

  @property
  def batch_size(self) -> int:
    return int(self.block['batch_size'])

  def load(self):
    return get_dataset(self.block, self.default_image_size)

  def image_shape(self) -> tuple[int, int, int]:
    return image_shape(self.block, self.default_image_size)

  def _check_keys(self, split: str) -> None:
    cfg, key = self.block, f'dataset.{split}'
    if cfg['name'] not in DATASETS:
      fail(f'{key}.name', cfg['name'], f'one of {sorted(DATASETS)}')
    if cfg['name'] == 'fashion_mnist':
      base = cfg['split'].partition('[')[0]
      if base not in fashion_mnist.FILES:
        fail(f'{key}.split', cfg['split'],
             f'one of {sorted(fashion_mnist.FILES)}')  # fmt: skip
    if cfg['name'] not in ('tfds', 'folder'):
      return
    size = cfg.get('image_size')
    if cfg['name'] == 'tfds' and not cfg.get('tfds_name'):
      fail(f'{key}.tfds_name', cfg.get('tfds_name'), 'a tfds dataset name')
    if size is not None and (not isinstance(size, int) or size <= 0):
      fail(f'{key}.image_size', size, 'a positive int (pixels) or None')
    if split == 'train' and size is not None and size < self.default_image_size:
      fail(f'{key}.image_size', size,
           f'the training canvas must be >= augment.size='
           f'{self.default_image_size}')  # fmt: skip
    resize = cfg.get('resize_size')
    if resize is not None and (size is None or resize < size):
      fail(f'{key}.resize_size', resize, f'None or >= image_size={size}')

  def check_files(self, split: str) -> None:
    """Start-up checks that read the file system (before any work)."""
    cfg = self.block
    if cfg['name'] == 'fashion_mnist':
      base = cfg['split'].partition('[')[0]
      data_dir = cfg.get('data_dir') or fashion_mnist.DEFAULT_DIR
      missing = [f for f in fashion_mnist.FILES[base]
                 if not os.path.exists(os.path.join(data_dir, f))]  # fmt: skip
      if missing:
        raise FileNotFoundError(
          f'config.dataset.{split}: Fashion-MNIST files {missing} are not in '
          f'{data_dir!r}. {fashion_mnist.HOW_TO_GET}'
        )
    if cfg['name'] == 'folder':
      # Evaluation pads its last batch; training needs one full batch.
      folder.check(cfg, self.batch_size if split == 'train' else 1)


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Runs `iterator` in a background thread, `size` items ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()

  def worker():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer.
      q.put(e)
    q.put(sentinel)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item = q.get()
    if item is sentinel:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


def orig_sizes(batch: Mapping[str, Any]):
  """batch['orig_size'], or the canvas size for batches without one."""
  if 'orig_size' in batch:
    return batch['orig_size']

  images = batch['image']
  return np.tile(np.asarray(images.shape[1:3], np.int32), (len(images), 1))
