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

import numpy as np

from vmoe_jsd.data import indexed


def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of epoch `epoch` (the in-memory datasets' own stream)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass
class ArrayDataset(indexed.IndexedBatches):
  """Images (N, H, W, C) uint8 and labels (N,) int32 held in host memory.

  Batches: indexed.IndexedBatches', training in this module's own order.

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
  permutation = staticmethod(_permutation)

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

  def _train_batch(self, index) -> dict[str, np.ndarray]:
    return {'image': self.images[index], 'label': self.labels[index]}

  def _eval_batch(self, positions, valid) -> dict[str, np.ndarray]:
    index = np.where(valid, positions, 0)  # Padding repeats example 0.
    return {
      'image': self.images[index],
      'label': self.labels[index],
      'mask': valid,
      'index': np.where(valid, positions, -1).astype(np.int32),
    }
