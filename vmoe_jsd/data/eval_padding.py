"""Evaluation batches that are the same in number on every process.

Every evaluation step runs collectives across processes, so all processes
must run the same number of steps, or the ones with an extra step hang
waiting for the others. A split read as one contiguous shard per process
(`tfds.even_splits`) gives shards whose sizes differ by one; so the number
of steps must come from the split size and the global batch, never from a
process's own shard:

  steps = ceil(total / global_batch), the same on every process,

and global batch b holds positions [b B, (b + 1) B) of the split, each
process taking its contiguous B / process_count of them. Positions past the
end are padding (mask False, index -1); every evaluation figure is computed
from masked sums (evaluation/core.py).
"""

from __future__ import annotations

import math


def eval_total(num_examples: int, limit: int | None) -> int:
  """Examples evaluated: the split, or its first `limit` when set.

  Args:
    num_examples: examples in the split.
    limit: config.evaluate.limit (None: all).

  Returns:
    min(limit, num_examples).
  """
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
