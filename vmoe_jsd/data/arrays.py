"""In-memory image datasets with a resumable, multi-process batch order.

The order of training examples is a pure function of (seed, step): the
stream is the concatenation of one permutation per epoch, and global batch
`step` is its slice [step * B, (step + 1) * B). Resuming at step n therefore
reproduces exactly the batches an uninterrupted run would have seen, with no
iterator state in the checkpoint. Each process takes its contiguous share of
every global batch (jax.process_index-th of jax.process_count()).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from vmoe_jsd.data import eval_padding


@dataclasses.dataclass
class ArrayDataset:
  """Images (N, H, W, C) uint8 and labels (N,) int32 held in host memory.

  Attributes:
    images: uint8 array (N, H, W, C).
    labels: int32 array (N,).
    num_classes: number of classes.
    name: for messages.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str = 'arrays'

  def __post_init__(self):
    if self.images.ndim != 4:
      raise ValueError(
        f'{self.name}: images must be (N, H, W, C), got {self.images.shape}'
      )
    if len(self.images) != len(self.labels):
      raise ValueError(
        f'{self.name}: {len(self.images)} images but {len(self.labels)} labels'
      )

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def train_batches(
    self,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's share of global batches start_step, +1, ...

    Args:
      batch_size: the global batch size B (images per step, all processes).
      seed: shuffling seed.
      start_step: first step to yield (resume).
      process_index: this process.
      process_count: number of processes; must divide batch_size.

    Yields:
      {'image': (B / process_count, H, W, C) uint8, 'label': (...,) int32}.
    """
    if batch_size % process_count:
      raise ValueError(
        f'batch_size={batch_size} must be divisible by the process count '
        f'{process_count}'
      )
    local = batch_size // process_count
    order = EpochOrder(len(self), seed)
    step = start_step
    while True:
      positions = np.arange(step * batch_size, (step + 1) * batch_size)
      index = order.take(positions)[
        process_index * local : (process_index + 1) * local
      ]
      yield {'image': self.images[index], 'label': self.labels[index]}
      step += 1

  def eval_batches(
    self,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Yields the dataset once in order, in fixed-size batches.

    Global batch i holds positions [i * B, (i + 1) * B) of the split; each
    process takes its contiguous share. The steps, ceil(total / B), are the
    same on every process (eval_padding.py); the last batch is padded by
    repeating example 0 with mask False and index -1, so every batch has the
    same shape (one compiled program).

    Args:
      batch_size: global batch size.
      process_index: this process.
      process_count: number of processes; must divide batch_size.
      limit: evaluate only the first `limit` examples.

    Yields:
      {'image', 'label', 'mask' (bool), 'index' (int32 position in the
      split, -1 for padding)} of B / process_count examples.
    """
    total = eval_padding.eval_total(len(self), limit)
    steps = eval_padding.num_eval_steps(total, batch_size, process_count)
    local = batch_size // process_count
    for step in range(steps):
      positions = np.arange(step * batch_size, (step + 1) * batch_size)
      mask = positions < total
      index = np.where(mask, positions, 0)
      sl = slice(process_index * local, (process_index + 1) * local)
      yield {
        'image': self.images[index[sl]],
        'label': self.labels[index[sl]],
        'mask': mask[sl],
        'index': np.where(mask, positions, -1)[sl].astype(np.int32),
      }


class EpochOrder:
  """Maps stream positions to example indices: epoch e uses perm(seed, e)."""

  def __init__(self, num_examples: int, seed: int):
    self.num_examples = num_examples
    self.seed = seed
    self._cache: dict[int, np.ndarray] = {}

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._cache:
      if len(self._cache) > 4:
        self._cache.pop(min(self._cache))
      rng = np.random.default_rng([self.seed, epoch])
      self._cache[epoch] = rng.permutation(self.num_examples)
    return self._cache[epoch]

  def take(self, positions: np.ndarray) -> np.ndarray:
    epochs = positions // self.num_examples
    offsets = positions % self.num_examples
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self.permutation(int(epoch))[offsets[sel]]
    return out
