"""Evaluation batches that are the same in number on every process.

Every evaluation step runs collectives across processes, so all processes
must run the same number of steps or the ones with an extra step hang. A
split read as one contiguous shard per process (`tfds.even_splits`) gives
shards whose sizes differ by one; the number of steps must therefore come
from the split size and the global batch, never from a process's own shard:

  steps = ceil(total / global_batch), the same on every process;

each process then pads its shard to `steps` batches of global_batch /
process_count examples. Padded examples carry mask False and index -1, and
every evaluation figure is computed from masked sums (evaluate.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def eval_total(num_examples: int, limit: int | None) -> int:
  """Examples evaluated: the split, or its first `limit` when set."""
  if limit is not None and limit < 0:
    raise ValueError(f'evaluate.limit={limit} must be >= 0 or None')
  return num_examples if limit is None else min(int(limit), num_examples)


def num_eval_steps(total: int, batch_size: int, process_count: int) -> int:
  """ceil(total / batch_size): the evaluation steps of every process.

  Args:
    total: examples evaluated (all processes together).
    batch_size: the global evaluation batch.
    process_count: processes; must divide batch_size.

  Returns:
    The number of steps.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
      f'evaluation batch_size={batch_size} must be a positive multiple of '
      f'the process count {process_count}'
    )
  return math.ceil(total / batch_size)


def shard_quotas(shard_sizes: Sequence[int], total: int) -> list[int]:
  """How many examples each process evaluates from its shard.

  All of every shard when `total` is the whole split; otherwise `total`
  spread as evenly as possible (total // P each, one more for the first
  processes whose shard has one to spare), so no process gets more than
  ceil(total / P) and the steps above always suffice.

  Args:
    shard_sizes: examples in each process's shard (sum >= total).
    total: examples to evaluate.

  Returns:
    Per-process counts that sum to `total`, each <= its shard.
  """
  if total > sum(shard_sizes):
    raise ValueError(f'total={total} exceeds the shards {list(shard_sizes)}')
  count = len(shard_sizes)
  quotas = [min(size, total // count) for size in shard_sizes]
  left = total - sum(quotas)
  for i, size in enumerate(shard_sizes):
    if left and size > quotas[i]:
      quotas[i] += 1
      left -= 1
  if left:  # Unreachable for shards that differ by at most one.
    raise ValueError(f'cannot spread {total} over shards {list(shard_sizes)}')
  return quotas


def pad_to_steps(
  batches: Iterable[dict[str, np.ndarray]],
  local_batch: int,
  num_steps: int,
  first_index: int,
  image_shape: Sequence[int],
) -> Iterator[dict[str, np.ndarray]]:
  """Exactly `num_steps` batches of `local_batch`, masked and indexed.

  Args:
    batches: this process's real examples in order, as {'image' uint8,
      'label' int32} batches of at most `local_batch` (possibly none).
    local_batch: examples per process per step.
    num_steps: steps every process runs (num_eval_steps).
    first_index: position in the split of this process's first example.
    image_shape: (H, W, C) of the images, for batches of padding only.

  Yields:
    {'image', 'label', 'mask' (bool), 'index' (int32, -1 for padding)}.
  """
  empty = {
    'image': np.zeros((0, *image_shape), np.uint8),
    'label': np.zeros((0,), np.int32),
  }
  step = 0
  index = first_index
  for batch in batches:
    n = len(batch['label'])
    if n > local_batch:
      raise ValueError(f'a batch of {n} exceeds the local batch {local_batch}')
    if step >= num_steps:
      raise ValueError(
        f'this process has more than {num_steps} x {local_batch} examples: '
        'its shard does not fit the steps computed from the split size'
      )
    yield _padded(batch, local_batch, np.arange(index, index + n))
    index += n
    step += 1
  for _ in range(step, num_steps):
    yield _padded(empty, local_batch, np.arange(0))


def _padded(batch, local_batch, index) -> dict[str, np.ndarray]:
  n = len(batch['label'])
  pad = local_batch - n
  out = {
    k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
    for k, v in batch.items()
  }
  out['mask'] = np.arange(local_batch) < n
  out['index'] = np.concatenate([index, np.full(pad, -1)]).astype(np.int32)
  return out
