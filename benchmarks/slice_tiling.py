r"""The vmoe-format index's slice check: signed corner counts vs pairwise.

  python benchmarks/slice_tiling.py [--num_slices=8000] [--rounds=3]

An (N, 4) float32 array stored as N row slices (the shape of the probe's
8,000-slice index, issue 16), checked by `vmoe_format.boxes_tile` and by
the quadratic pairwise overlap test it replaced (copied below as the
reference), interleaved round by round; both must agree. Prints the best
wall time of each. No assertion on time: a script for a quiet machine.
"""

import time

import numpy as np

from vmoe_jsd import cli
from vmoe_jsd.checkpoints import vmoe_format


def pairwise_tiles(bounds, shape) -> bool:
  """The check before issue 16: volume, then every pair for an overlap."""
  volume = sum(int(np.prod([b - a for a, b in bs])) for bs in bounds)
  overlap = any(
    all(max(a0, b0) < min(a1, b1)
        for (a0, a1), (b0, b1) in zip(x, y, strict=True))
    for i, x in enumerate(bounds)
    for y in bounds[i + 1 :]
  )  # fmt: skip
  return volume == int(np.prod(shape)) and not overlap


def main() -> None:
  parser = cli.ArgumentParser()
  parser.add_argument('--num_slices', type=int, default=8000)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  n = args.num_slices
  shape = (n, 4)
  bounds = [((i, i + 1), (0, 4)) for i in range(n)]
  best = {'corners': float('inf'), 'pairwise': float('inf')}
  for _ in range(args.rounds):
    for name, fn in (('corners', vmoe_format.boxes_tile),
                     ('pairwise', pairwise_tiles)):  # fmt: skip
      start = time.perf_counter()
      assert fn(bounds, shape)
      best[name] = min(best[name], time.perf_counter() - start)
  ratio = best['pairwise'] / best['corners']
  print(f'{n} slices: corners {best["corners"]:.4f} s, pairwise '
        f'{best["pairwise"]:.2f} s ({ratio:.0f}x)')  # fmt: skip


if __name__ == '__main__':
  main()
