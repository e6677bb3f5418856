r"""Cost of each eval_main suite (docs/robustness.md), in fresh processes.

  python benchmarks/robustness_cost.py --workdir=/tmp/h8/run \
      [--config=configs/default.py] [--limits=400,2000] \
      [--attack_limits=400,1200]

--workdir is a training workdir of the config's model (a `:runlocal` run has
the default model: costs depend on the model and the image count, not on
how long it trained). Each suite runs in its own `python -m vmoe_jsd.eval_main`
process at two image limits; the table gives wall and CPU seconds (user +
sys of the child, all threads) per run, and the fit cost = fixed + per_image
x N from the two limits (fixed: start-up, loading and compilation). The
standard suite (accuracy, routing figures, stability) runs once on the whole
split for scale. Suites run interleaved (all suites at one limit, then at
the next), so a change of machine load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd: list[str]) -> tuple[float, float]:
  """(wall seconds, child CPU seconds) of one command."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.time() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return wall, cpu


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--limits', default='400,2000')
  parser.add_argument('--attack_limits', default='400,1200')
  parser.add_argument('--out', default=None, help='JSON of the timings')
  args = parser.parse_args()
  limits = [int(x) for x in args.limits.split(',')]
  attack_limits = [int(x) for x in args.attack_limits.split(',')]
  scratch = tempfile.mkdtemp()
  base = [sys.executable, '-m', 'vmoe_jsd.eval_main', f'--config={args.config}',
          f'--checkpoint={args.workdir}']  # fmt: skip
  rows = []
  wall, cpu = timed(base + ['--suite=standard',
                            f'--output={scratch}/standard.json'])  # fmt: skip
  rows.append(('standard', None, wall, cpu))
  print(
    f'standard (whole split): {wall:.1f} s wall, {cpu:.1f} s CPU', flush=True
  )
  for i in range(2):
    for suite in ('corruptions', 'attacks', 'cheap'):
      n = (attack_limits if suite == 'attacks' else limits)[i]
      key = 'attack.limit' if suite == 'attacks' else 'limit'
      flag = f'--config.evaluate.robustness.{key}={n}'
      out = f'--output={scratch}/{suite}_{n}.json'
      wall, cpu = timed(base + [f'--suite={suite}', flag, out])
      rows.append((suite, n, wall, cpu))
      print(f'{suite} N={n}: {wall:.1f} s wall, {cpu:.1f} s CPU', flush=True)
  fits = {}
  for suite in ('corruptions', 'attacks', 'cheap'):
    (n1, w1, c1), (n2, w2, c2) = [
      (n, w, c) for s, n, w, c in rows if s == suite
    ]
    fits[suite] = {
      'wall_per_image': (w2 - w1) / (n2 - n1),
      'wall_fixed': w1 - n1 * (w2 - w1) / (n2 - n1),
      'cpu_per_image': (c2 - c1) / (n2 - n1),
      'cpu_fixed': c1 - n1 * (c2 - c1) / (n2 - n1),
    }
    f = fits[suite]
    print(f'{suite}: wall {f["wall_fixed"]:.1f} s + '
          f'{f["wall_per_image"] * 1000:.1f} s per 1000 images; CPU '
          f'{f["cpu_fixed"]:.1f} s + {f["cpu_per_image"] * 1000:.1f} s per '
          '1000 images')  # fmt: skip
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'runs': rows, 'fits': fits,
                 'load_average': os.getloadavg()}, f, indent=1)  # fmt: skip


if __name__ == '__main__':
  main()
