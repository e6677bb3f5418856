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

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

DATASETS = ('fashion_mnist', 'folder', 'synthetic', 'tfds')


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
  if name == 'fashion_mnist':
    from vmoe_jsd.data import fashion_mnist  # noqa: PLC0415

    return fashion_mnist.load(cfg['split'], cfg.get('data_dir'))
  if name == 'synthetic':
    from vmoe_jsd.data import synthetic  # noqa: PLC0415

    return synthetic.load(
      cfg['split'],
      num_examples=cfg.get('num_examples', 512),
      image_size=cfg.get('image_size', 16),
      channels=cfg.get('channels', 1),
      num_classes=cfg.get('num_classes', 4),
      seed=cfg.get('seed', 0),
    )
  if name == 'tfds':
    from vmoe_jsd.data import tfds_data  # noqa: PLC0415

    return tfds_data.TfdsDataset(
      cfg['tfds_name'],
      cfg['split'],
      image_size=cfg['image_size'],
      data_dir=cfg.get('data_dir'),
      resize_size=cfg.get('resize_size'),
      mini=cfg.get('mini', False),
      num_workers=cfg.get('num_workers'),
    )
  if name == 'folder':
    from vmoe_jsd.data import folder  # noqa: PLC0415

    return folder.FolderDataset(
      cfg['data_dir'],
      cfg['split'],
      image_size=cfg.get('image_size') or default_image_size,
      channels=cfg.get('channels', 3),
      resize_size=cfg.get('resize_size'),
      num_workers=cfg.get('num_workers'),
    )
  raise ValueError(
    f'dataset.name={name!r} is unknown; choose one of {sorted(DATASETS)}'
  )


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
  import numpy as np  # noqa: PLC0415

  images = batch['image']
  return np.tile(np.asarray(images.shape[1:3], np.int32), (len(images), 1))
