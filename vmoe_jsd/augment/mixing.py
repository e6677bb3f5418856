"""Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR
2018) of paired views, as vmoe mixes its batches, keeping each image's maps.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from vmoe_jsd import sharding
from vmoe_jsd.augment.settings import is_int, is_real

Array = jax.Array


def mixup(
  key: Array,
  views: Array,
  maps: Array,
  labels: Array,
  *,
  concentration: float,
  num_classes: int,
  num_groups: int = 1,
) -> tuple[Array, Array, Array, Array]:
  """Mixup of paired views (Zhang et al., ICLR 2018), as vmoe's "light1".

  vmoe (vmoe/train/trainer.py `mixup`, granularity 'device', size 2) draws
  one weight pair from Dirichlet(concentration, concentration) per device,
  sorts it so the larger weight lambda >= 1/2 comes first, and mixes every
  example i of the device's shard with the next one, i + 1 (cyclically,
  `jnp.roll` inside the shard): x_i' = lambda x_i + (1 - lambda) x_{i+1}, and
  the same for the one-hot labels.

  With two views, the rule here (what the consistency loss sees): both views
  of image i are mixed with the views of the same partner j = i + 1 with the
  same lambda, view 1 with view 1 and view 2 with view 2. The sorting makes
  image i the dominant one in both (lambda >= 1/2 always), so the patch
  correspondences are image i's: `maps` come back unchanged. A point of
  image i shown by patch a of view 1 and patch b of view 2 is shown, with
  weight lambda, by both mixed patches; the overlay of image j (weight
  1 - lambda <= 1/2) follows j's own correspondences, which are ignored (at
  lambda = 1/2 exactly, image i is still the one followed).

  Groups: the batch axis is cut into `num_groups` contiguous blocks of equal
  size (pass the number of devices the batch is split over: each block is
  then one device's shard, as `jax.device_put` with a batch-sharded
  NamedSharding lays it out); partners and lambdas never cross a block, so
  no data moves between devices (the roll is inside each shard). Under an
  active (data, expert) mesh the weights are drawn replicated.

  Args:
    key: a PRNG key.
    views: (B, 2, S, S, C) the two views of each image.
    maps: (B, 2, P) their patch correspondences.
    labels: (B,) integer class ids or (B, num_classes) targets.
    concentration: Dirichlet concentration, > 0 (vmoe's light1: 0.2).
    num_classes: number of classes of the integer labels.
    num_groups: number of blocks (devices); must divide B.

  Returns:
    views: (B, 2, S, S, C) mixed views.
    maps: (B, 2, P) unchanged (image i's).
    targets: (B, num_classes) float32 soft labels.
    lam: (num_groups,) float32 weight of each block's own images, >= 1/2.

  Raises:
    ValueError: for concentration <= 0 or num_groups not dividing B.
  """
  _check_mixup(concentration, num_groups, views.shape[0])
  if jnp.issubdtype(labels.dtype, jnp.integer):
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  else:
    targets = labels.astype(jnp.float32)
  weights = jax.random.dirichlet(
    key, jnp.full((2,), concentration, jnp.float32), (num_groups,)
  )
  # Drawn whole on every device: left to propagation, the draw is split over
  # the devices and its rejection loop all-reduces a stop flag per round.
  weights = sharding.constrain(weights, jax.sharding.PartitionSpec())
  lam = jnp.max(weights, axis=-1)  # vmoe sorts: the larger weight first.
  return _mix(views, lam), maps, _mix(targets, lam), lam


def _check_mixup(concentration: Any, num_groups: Any, batch: int) -> None:
  if not is_real(concentration) or not 0 < concentration < math.inf:
    raise ValueError(
      f'mixup concentration={concentration!r} must be a number > 0 (0 means '
      'no mixup: do not call mixup then).'
    )
  if not is_int(num_groups) or num_groups < 1 or batch % num_groups:
    raise ValueError(
      f'num_groups={num_groups!r} must be a positive integer dividing the '
      f'batch size {batch}.'
    )


def _mix(x: Array, lam: Array) -> Array:
  """Mixes each of len(lam) blocks of x's rows with the next row (cyclic)."""
  num_groups = lam.shape[0]
  grouped = x.reshape(num_groups, x.shape[0] // num_groups, *x.shape[1:])
  partner = jnp.roll(grouped, -1, axis=1)
  weight = lam.reshape((num_groups,) + (1,) * (grouped.ndim - 1))
  mixed = weight * grouped + (1 - weight) * partner
  return mixed.reshape(x.shape).astype(x.dtype)
