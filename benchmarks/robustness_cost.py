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

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from vmoe_jsd import cli

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


def _limits(name: str, text: str) -> list[int]:
  """The image limits of --name (two or more integers >= 1), or one line."""
  parts = text.split(',')
  if len(parts) < 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
    cli.fail(
      f'--{name}={text!r} is invalid: expected two or more image counts '
      "(integers >= 1), comma-separated, e.g. '400,2000'"
    )
  return [int(p) for p in parts]


def main():
  parser = cli.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--limits', default='400,2000')
  parser.add_argument('--attack_limits', default='400,1200')
  parser.add_argument('--out', default=None, help='JSON of the timings')
  args = parser.parse_args()
  if not os.path.isdir(args.workdir):
    cli.fail(cli.missing_path_message('workdir', args.workdir, 'a workdir'))
  limits = _limits('limits', args.limits)
  attack_limits = _limits('attack_limits', args.attack_limits)
  scratch = tempfile.mkdtemp()  # The JSON files; removed after timing.
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
  shutil.rmtree(scratch)
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
