"""A small synthetic, learnable image dataset for tests and smoke runs.

Each class c has a fixed random template; an example is its class template,
shifted by a random offset, plus noise. Deterministic given the seed.
"""

from __future__ import annotations

import numpy as np

from vmoe_jsd.data.arrays import ArrayDataset


def load(
  split: str = 'train',
  *,
  num_examples: int = 512,
  image_size: int = 16,
  channels: int = 1,
  num_classes: int = 4,
  seed: int = 0,
) -> ArrayDataset:
  """Returns a synthetic dataset; 'train' and 'test' use disjoint seeds.

  Args:
    split: 'train' or 'test' (different noise and offsets, same templates).
    num_examples: N.
    image_size: H = W.
    channels: C.
    num_classes: classes.
    seed: template seed.

  Returns:
    An ArrayDataset of uint8 images.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"split={split!r} is unknown; choose 'train' or 'test'")
  templates = np.random.default_rng(seed).uniform(
    0, 255, (num_classes, image_size, image_size, channels)
  )
  rng = np.random.default_rng([seed, 1 if split == 'train' else 2])
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  shifts = rng.integers(-2, 3, (num_examples, 2))
  images = np.stack(
    [
      np.roll(templates[y], tuple(s), axis=(0, 1))
      for y, s in zip(labels, shifts, strict=True)
    ]
  )
  images = images + rng.normal(0, 20, images.shape)
  images = np.clip(images, 0, 255).astype(np.uint8)
  return ArrayDataset(images, labels, num_classes, name=f'synthetic:{split}')
