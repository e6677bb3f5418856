"""The run's random streams, named, in one place.

Every random number of a run comes from `stream(seed, name)`: parameter
initialisation, the training steps (each step folds its number in, then
splits augmentation, dropout and router noise, and folds MIXUP in for the
mixup partner), the evaluation's two views (each test example folds its
position in the split in) and the stability noise (each batch folds its
index in). A resumed run re-derives every key from the seed and the step,
so it repeats what an uninterrupted run would have done (DESIGN.md).

The numbers are those of the first releases: changing one changes every
result of every config.
"""

from __future__ import annotations

import jax

STREAMS = {'init': 0, 'train': 1, 'eval_views': 2, 'stability_noise': 3}
# Folded into a training step's key for its mixup partner and lambda.
MIXUP = 1


def stream(seed: int, name: str) -> jax.Array:
  """The root key of stream `name` (a key of STREAMS) for `seed`."""
  if name not in STREAMS:
    raise ValueError(
      f'random stream {name!r} is unknown; choose one of {sorted(STREAMS)}'
    )
  return jax.random.fold_in(jax.random.key(seed), STREAMS[name])


def train_step_keys(
  train_key: jax.Array, step: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(augmentation, dropout, gating, mixup) keys of training step `step`."""
  step_key = jax.random.fold_in(train_key, step)
  aug_key, dropout_key, gating_key = jax.random.split(step_key, 3)
  return aug_key, dropout_key, gating_key, jax.random.fold_in(step_key, MIXUP)


def example_keys(root: jax.Array, index: jax.Array) -> jax.Array:
  """One key per example, folded from its position in the split."""
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(index.astype('uint32'))
