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
from typing import Any, NamedTuple

import numpy as np

from vmoe_jsd.config_errors import check_choice, lookup, reject, to_dict
from vmoe_jsd.data import fashion_mnist, folder, synthetic, tfds_data


class DatasetKind(NamedTuple):
  """What the code knows of one dataset name (an entry of DATASET_KINDS).

  Attributes:
    load: (block, default image size) -> the dataset.
    image_shape: (block, default image size) -> (H, W, C), reading nothing.
    check: (dotted key of the block, block, default image size, is_train)
      -> None; pure checks, raising ConfigError naming the key.
    check_files: (split name, block, global batch) -> None; start-up checks
      that touch the file system.
    num_classes: block -> the number of classes of the data, read at
      start-up without loading it (config_lib.check_inputs compares it
      with model.num_classes); None where it is not known.
  """

  load: Callable[[Mapping, int | None], Any]
  image_shape: Callable[[Mapping, int | None], tuple[int, int, int]]
  check: Callable[[str, Mapping, int | None, bool], None] | None = None
  check_files: Callable[[str, Mapping, int], None] | None = None
  num_classes: Callable[[Mapping], int] | None = None


def _square(size: int, channels: int) -> tuple[int, int, int]:
  return (size, size, channels)


def _check_fashion(key: str, cfg: Mapping, *_) -> None:
  if cfg['split'].partition('[')[0] not in fashion_mnist.FILES:
    reject(
      f'{key}.split', cfg['split'], f'one of {sorted(fashion_mnist.FILES)}'
    )


def _fashion_files(split: str, cfg: Mapping, batch: int) -> None:
  del batch
  data_dir = cfg.get('data_dir') or fashion_mnist.DEFAULT_DIR
  base = cfg['split'].partition('[')[0]
  missing = [
    f
    for f in fashion_mnist.FILES[base]
    if not os.path.exists(os.path.join(data_dir, f))
  ]
  if missing:
    raise FileNotFoundError(
      f'config.dataset.{split}: Fashion-MNIST files {missing} are not in '
      f'{data_dir!r}. {fashion_mnist.HOW_TO_GET}'
    )


def _check_canvas(key: str, cfg: Mapping, default_size, is_train) -> None:
  """Keys of a 'tfds' or 'folder' block (images resized into a canvas)."""
  size = cfg.get('image_size')
  if cfg['name'] == 'tfds' and not cfg.get('tfds_name'):
    reject(f'{key}.tfds_name', cfg.get('tfds_name'), 'a tfds dataset name')
  if size is not None and (not isinstance(size, int) or size <= 0):
    reject(f'{key}.image_size', size, 'a positive int (pixels) or None')
  if is_train and size is not None and size < default_size:
    valid = f'the training canvas must be >= augment.size={default_size}'
    reject(f'{key}.image_size', size, valid)
  resize = cfg.get('resize_size')
  if resize is not None and (size is None or resize < size):
    reject(f'{key}.resize_size', resize, f'None or >= image_size={size}')


def _folder_files(split: str, cfg: Mapping, batch: int) -> None:
  # Evaluation pads its last batch; training needs one full batch.
  folder.check(cfg, batch if split == 'train' else 1)


DATASET_KINDS: dict[str, DatasetKind] = {
  'fashion_mnist': DatasetKind(
    load=lambda cfg, _: fashion_mnist.load(cfg['split'], cfg.get('data_dir')),
    image_shape=lambda cfg, _: (28, 28, 1),
    check=_check_fashion,
    check_files=_fashion_files,
    num_classes=lambda cfg: len(fashion_mnist.CLASS_NAMES),
  ),
  'folder': DatasetKind(
    load=lambda cfg, size: folder.FolderDataset(
      cfg['data_dir'],
      cfg['split'],
      image_size=cfg.get('image_size') or size,
      channels=cfg.get('channels', 3),
      resize_size=cfg.get('resize_size'),
      num_workers=cfg.get('num_workers'),
    ),
    image_shape=lambda cfg, size: _square(
      cfg.get('image_size') or size, cfg.get('channels', 3)
    ),
    check=_check_canvas,
    check_files=_folder_files,
    num_classes=lambda cfg: len(folder.list_classes(cfg.get('data_dir'))),
  ),
  'synthetic': DatasetKind(
    load=lambda cfg, _: synthetic.load(
      cfg['split'],
      num_examples=cfg.get('num_examples', 512),
      image_size=cfg.get('image_size', 16),
      channels=cfg.get('channels', 1),
      num_classes=cfg.get('num_classes', 4),
      seed=cfg.get('seed', 0),
    ),
    image_shape=lambda cfg, _: _square(
      cfg.get('image_size', 16), cfg.get('channels', 1)
    ),
    num_classes=lambda cfg: cfg.get('num_classes', 4),
  ),
  'tfds': DatasetKind(
    load=lambda cfg, _: tfds_data.TfdsDataset(
      cfg['tfds_name'],
      cfg['split'],
      image_size=cfg['image_size'],
      data_dir=cfg.get('data_dir'),
      resize_size=cfg.get('resize_size'),
      mini=cfg.get('mini', False),
      num_workers=cfg.get('num_workers'),
    ),
    image_shape=lambda cfg, _: _square(
      cfg['image_size'], cfg.get('channels', 3)
    ),
    check=_check_canvas,
    num_classes=lambda cfg: tfds_data.num_classes(
      cfg['tfds_name'], cfg.get('data_dir'), mini=cfg.get('mini', False)
    ),
  ),
}
DATASETS = tuple(sorted(DATASET_KINDS))


def _kind(cfg: Mapping[str, Any]) -> DatasetKind:
  return lookup(DATASET_KINDS, 'dataset.name', cfg['name'])


def get_dataset(cfg: Mapping[str, Any], default_image_size: int | None = None):
  """Builds the dataset described by one config.dataset.<split> block.

  Args:
    cfg: the block (name, split and the dataset's own keys).
    default_image_size: image_size of a 'folder' block that sets none (the
      augmentation size).
  """
  return _kind(cfg).load(cfg, default_image_size)


def image_shape(
  cfg: Mapping[str, Any], default_image_size: int | None = None
) -> tuple[int, int, int]:
  """(H, W, C) of a dataset block's images, without reading data (the
  canvas of 'tfds' and 'folder' blocks)."""
  return _kind(cfg).image_shape(cfg, default_image_size)


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
    key, name = f'dataset.{split}', spec.block['name']
    check_choice(f'{key}.name', name, list(DATASETS))
    check = DATASET_KINDS[name].check
    if check is not None:
      check(key, spec.block, default_image_size, split == 'train')
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

  def num_classes(self) -> int | None:
    """The data's number of classes, read without loading it (None where
    the dataset kind does not know it)."""
    num_classes = DATASET_KINDS[self.name].num_classes
    return None if num_classes is None else num_classes(self.block)

  def check_files(self, split: str) -> None:
    """Start-up checks that read the file system (before any work)."""
    check_files = DATASET_KINDS[self.name].check_files
    if check_files is not None:
      check_files(split, self.block, self.batch_size)


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
