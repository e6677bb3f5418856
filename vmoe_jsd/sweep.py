r"""Hyperparameter sweeps over a config's `get_hyper(hyper)`, and their tables.

  python -m vmoe_jsd.sweep --config=configs/default.py[:runlocal] \
      --workdir=runs/name [--parallel=N] [--dry_run] [--config.key=value ...]
  python -m vmoe_jsd.sweep --collect --workdir=runs/name

A config file may define `get_hyper(hyper)` as vmoe's configs do: it returns
a list of points, each a dict of overrides {'config.key': value}, built with

  hyper.sweep('config.seed', [0, 1, 2])   # one point per value
  hyper.fixed('config.key', value)        # one point
  hyper.product([s1, s2, ...])            # every combination (s1 outermost)
  hyper.zipit([s1, s2, ...])              # element-wise (equal lengths)
  hyper.chainit([s1, s2, ...])            # one after the other

(`hyper.product([])` is one point without overrides). Each point trains in
its own workdir, `<workdir>/<key>=<value>,<key>=<value>` (keys without the
'config.' prefix, in the order of the point), through
`python -m vmoe_jsd.main --config=... --workdir=... --config.<key>=<value>`;
`--config.<key>=<value>` flags given to the sweep apply to every point.
Every point's config is built and validated before the first one starts.
Points whose results.json is complete are skipped, so the same command
resumes an interrupted sweep (a point that was killed resumes from its last
checkpoint). `--dry_run` prints the commands instead (ready for the scripts
in launch/). Each point's console output goes to `<point>/run.log`.

`--collect` writes `sweep_results.md` (both tables), `sweep_results.csv`
(one row per point: its overrides and final metrics: test accuracy and, per
MoE layer, agreement, kappa, JSD, confidence, H/Hmax, dropped) and
`sweep_summary.csv` (mean and sample standard deviation, ddof=1, over the
seeds of every group of points that share their other overrides; a key
named `seed` or ending in `.seed` is a seed).
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vmoe_jsd import cli, run_files

MANIFEST = 'sweep.json'
POINT_FILE = 'sweep_point.json'
Point = dict[str, Any]


# ----------------------------------------------------------------------------
# get_hyper vocabulary.
# ----------------------------------------------------------------------------
class Hyper:
  """The `hyper` argument of a config's get_hyper (vmoe's vocabulary)."""

  @staticmethod
  def sweep(key: str, values: Sequence[Any]) -> list[Point]:
    """One point per value of `key`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
      raise cli.CliError(
        f'hyper.sweep({key!r}, {values!r}): values must be a list'
      )
    return [{key: v} for v in values]

  @staticmethod
  def fixed(key: str, value: Any) -> list[Point]:
    """A single point setting `key`."""
    return [{key: value}]

  @staticmethod
  def product(sweeps: Sequence[Sequence[Point]]) -> list[Point]:
    """Every combination; the first sweep varies slowest."""
    return [_merged(combo) for combo in itertools.product(*sweeps)]

  @staticmethod
  def zipit(sweeps: Sequence[Sequence[Point]]) -> list[Point]:
    """Element-wise combination of sweeps of equal length."""
    lengths = [len(s) for s in sweeps]
    if len(set(lengths)) > 1:
      raise cli.CliError(f'hyper.zipit needs sweeps of equal length: {lengths}')
    return [_merged(combo) for combo in zip(*sweeps, strict=True)]

  @staticmethod
  def chainit(sweeps: Sequence[Sequence[Point]]) -> list[Point]:
    """The points of every sweep, one sweep after the other."""
    return [dict(p) for s in sweeps for p in s]


def _merged(parts: Sequence[Point]) -> Point:
  """One point from several: later parts win on a shared key."""
  return {key: value for part in parts for key, value in part.items()}


def _strip(key: str) -> str:
  return key[len('config.') :] if key.startswith('config.') else key


def load_points(config_arg: str) -> list[Point]:
  """The points of `--config=FILE[:ARG]`'s get_hyper, keys without 'config.'.

  Raises:
    CliError: missing file, no get_hyper, or a malformed result.
  """
  missing = cli.missing_config_message(config_arg)
  if missing:
    raise cli.CliError(missing)
  path = config_arg.split(':', 1)[0]
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_hyper = getattr(module, 'get_hyper', None)
  if get_hyper is None:
    raise cli.CliError(
      f'{path} defines no get_hyper(hyper); add one returning e.g. '
      "hyper.product([hyper.sweep('config.seed', [0, 1, 2])])"
    )
  points = get_hyper(Hyper())
  if not isinstance(points, list) or not all(
    isinstance(p, Mapping) for p in points
  ):
    raise cli.CliError(
      f'{path}: get_hyper must return a list of dicts (hyper.product, '
      f'hyper.zipit, hyper.sweep); got {type(points).__name__}'
    )
  if not points:
    raise cli.CliError(f'{path}: get_hyper returned no points')
  return [{_strip(k): v for k, v in p.items()} for p in points]


# ----------------------------------------------------------------------------
# Points -> names, command lines.
# ----------------------------------------------------------------------------
def cli_value(value: Any) -> str:
  """A value as `--config.key=` expects it (tuples without spaces)."""
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (tuple, list)):
    inner = ','.join(cli_value(v) for v in value)
    return f'({inner},)' if len(value) == 1 else f'({inner})'
  return repr(value)


def point_name(point: Mapping[str, Any]) -> str:
  """`key=value,key=value` (a folder name; '/' and spaces replaced)."""
  if not point:
    return 'base'
  name = ','.join(f'{k}={cli_value(v)}' for k, v in point.items())
  return name.replace('/', '_').replace(' ', '')


def point_command(
  config_arg: str,
  workdir: str,
  point: Mapping[str, Any],
  extra: Sequence[str] = (),
) -> list[str]:
  """The `python -m vmoe_jsd.main ...` command of one point."""
  return [
    sys.executable,
    '-m',
    'vmoe_jsd.main',
    f'--config={config_arg}',
    f'--workdir={workdir}',
    *extra,
    *(f'--config.{k}={cli_value(v)}' for k, v in point.items()),
  ]


def _point_config(config_arg: str, point, extra: Sequence[str]):
  argv = ['sweep', f'--config={config_arg}', *extra]
  argv += [f'--config.{k}={cli_value(v)}' for k, v in point.items()]
  return cli.load_config(argv)


def check_points(config_arg: str, points, extra: Sequence[str]) -> list[int]:
  """Builds and validates every point's config; returns num_train_steps.

  Validation uses as many devices as config.num_expert_partitions: a config
  valid on any device count that the expert axis divides is valid there.

  Raises:
    CliError: the first point that fails, named, with the reason.
  """
  steps = []
  for point in points:
    try:
      config = _point_config(config_arg, point, extra)
      cli.check_config(config, int(config.get('num_expert_partitions', 1)))
    except cli.CliError as e:
      raise cli.CliError(f'sweep point {point_name(point)}: {e}') from None
    steps.append(int(config.get('num_train_steps') or 0) or None)
  return steps


# ----------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------
def run_sweep(
  config_arg: str,
  workdir: str,
  *,
  parallel: int = 1,
  dry_run: bool = False,
  extra: Sequence[str] = (),
  out=sys.stdout,
) -> dict[str, int]:
  """Runs the unfinished points of the sweep (see the module docstring).

  Args:
    config_arg: `FILE[:ARG]` of the config defining get_hyper.
    workdir: the sweep's folder; each point gets a subfolder.
    parallel: points run at the same time.
    dry_run: print the commands only.
    extra: `--config.key=value` overrides for every point.
    out: where progress lines go.

  Returns:
    Counts: {'points', 'skipped', 'ran', 'failed'}.
  """
  if parallel < 1:
    raise cli.CliError(f'--parallel={parallel} is invalid: must be >= 1')
  points = load_points(config_arg)
  names = [point_name(p) for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise cli.CliError(f'get_hyper gives the same point twice: {dupes}')
  steps = check_points(config_arg, points, extra)
  todo = _unfinished(workdir, points, names, steps, dry_run, out)
  skipped = len(points) - len(todo)
  counts = {'points': len(points), 'skipped': skipped, 'ran': 0, 'failed': 0}
  if dry_run:
    for point, _, point_dir in todo:
      cmd = point_command(config_arg, point_dir, point, extra)
      print(shlex.join(cmd), file=out)
    return counts
  os.makedirs(workdir, exist_ok=True)
  run_files.write_json(
    os.path.join(workdir, MANIFEST),
    {'config': config_arg, 'extra': list(extra),
     'points': [{'name': n, 'overrides': p}
                for n, p in zip(names, points, strict=True)]},
  )  # fmt: skip
  print(
    f'Sweep {workdir}: {len(points)} points, {skipped} finished, '
    f'{len(todo)} to run ({parallel} at a time).',
    file=out,
    flush=True,
  )
  _run_points(todo, config_arg, extra, parallel, counts, out)
  return counts


def _unfinished(workdir, points, names, steps, dry_run, out) -> list[tuple]:
  """(point, name, folder) of the points without a complete results.json."""
  todo = []
  for point, name, num_steps in zip(points, names, steps, strict=True):
    point_dir = os.path.join(workdir, name)
    if run_files.finished_result(point_dir, num_steps) is None:
      todo.append((point, name, point_dir))
    elif dry_run:
      print(f'# finished, skipped: {point_dir}', file=out)
  return todo


def _run_points(todo, config_arg, extra, parallel, counts, out) -> None:
  """Runs `todo`, `parallel` processes at a time; counts 'ran' and 'failed'."""
  running, queue = [], list(todo)
  while queue or running:
    while queue and len(running) < parallel:
      running.append(_start_point(config_arg, extra, *queue.pop(0), out))
    time.sleep(0.2)
    _reap(running, counts, len(todo), out)


def _start_point(config_arg, extra, point, name, point_dir, out) -> tuple:
  """Starts one point: (process, name, folder, start time, log file)."""
  os.makedirs(point_dir, exist_ok=True)
  run_files.write_json(os.path.join(point_dir, POINT_FILE), point)
  log = open(os.path.join(point_dir, 'run.log'), 'a')  # noqa: SIM115
  cmd = point_command(config_arg, point_dir, point, extra)
  print(f'start {name}: {shlex.join(cmd)}', file=out, flush=True)
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
  return proc, name, point_dir, time.time(), log


def _reap(running: list, counts: dict[str, int], total: int, out) -> None:
  """Reports the finished processes of `running` and removes them."""
  for item in list(running):
    proc, name, point_dir, t0, log = item
    if proc.poll() is None:
      continue
    log.close()
    running.remove(item)
    took = time.time() - t0
    result = run_files.finished_result(point_dir)
    if proc.returncode == 0 and result is not None:
      counts['ran'] += 1
      status = f'done in {took:.0f}s, accuracy {result["accuracy"]:.4f}'
    else:
      counts['failed'] += 1
      status = (
        f'FAILED (exit {proc.returncode}) after {took:.0f}s; see '
        f'{os.path.join(point_dir, "run.log")}: {_last_line(point_dir)}'
      )
    done = counts['ran'] + counts['failed']
    print(f'[{done}/{total}] {name}: {status}', file=out, flush=True)


def _last_line(point_dir: str) -> str:
  try:
    with open(os.path.join(point_dir, 'run.log')) as f:
      lines = [x.strip() for x in f if x.strip()]
    return lines[-1][:300] if lines else '(empty log)'
  except OSError:
    return '(no log)'


# ----------------------------------------------------------------------------
# Collecting.
# ----------------------------------------------------------------------------
ROUTING_FIELDS = (
  ('agreement', 'agree'),
  ('kappa', 'kappa'),
  ('jsd', 'jsd'),
  ('confidence', 'conf'),
  ('entropy_fraction', 'H/Hmax'),
  ('dropped', 'dropped'),
)


def is_seed_key(key: str) -> bool:
  return key == 'seed' or key.endswith('.seed')


def _layer_label(layer: str) -> str:
  return layer.replace('encoderblock_', 'block')


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
  """Flat final metrics of a results.json: accuracy, <layer>.<figure>."""
  metrics = {'accuracy': float(result['accuracy'])}
  for layer, figures in sorted((result.get('routing') or {}).items()):
    for field, label in ROUTING_FIELDS:
      if field in figures:
        metrics[f'{_layer_label(layer)}.{label}'] = float(figures[field])
  return metrics


def _discover(workdir: str) -> list[tuple[str, dict[str, Any]]]:
  """(name, overrides) of every point: from the manifest, else the folders."""
  manifest = os.path.join(workdir, MANIFEST)
  if os.path.exists(manifest):
    data = run_files.read_json(manifest)
    return [(p['name'], dict(p['overrides'])) for p in data['points']]
  found = []
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name, POINT_FILE)
    if os.path.exists(path):
      found.append((name, run_files.read_json(path)))
  return found


def collect(workdir: str) -> tuple[list[dict], list[dict], list[str]]:
  """Rows per point and per group of seeds.

  Returns:
    (point rows, group rows, metric names). A point row holds its overrides,
    'status' and the metrics; a group row holds the non-seed overrides,
    'n' (finished seeds) and '<metric> mean' / '<metric> std' (sample std,
    ddof=1; empty with one seed).

  Raises:
    CliError: no sweep points under workdir.
  """
  if not os.path.isdir(workdir):
    raise cli.CliError(f'--workdir={workdir!r} does not exist')
  points = _discover(workdir)
  if not points:
    raise cli.CliError(
      f'no sweep points under {workdir!r} (no {MANIFEST}, no */{POINT_FILE})'
    )
  keys: list[str] = []
  for _, overrides in points:
    keys += [k for k in overrides if k not in keys]
  rows, metric_names = [], []
  for name, overrides in points:
    row = {k: cli_value(overrides[k]) if k in overrides else ''
           for k in keys}  # fmt: skip
    result = run_files.finished_result(os.path.join(workdir, name))
    row['status'] = 'finished' if result is not None else 'missing'
    if result is not None:
      metrics = result_metrics(result)
      metric_names += [m for m in metrics if m not in metric_names]
      row.update(metrics)
    rows.append(row)
  group_keys = [k for k in keys if not is_seed_key(k)]
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    if row['status'] == 'finished':
      groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
  summary = []
  for members in groups.values():
    out = {k: members[0][k] for k in group_keys}
    out['n'] = len(members)
    for m in metric_names:
      values = [r[m] for r in members if m in r]
      out[f'{m} mean'], out[f'{m} std'] = mean_std(values)
    summary.append(out)
  return rows, summary, metric_names


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (ddof=1; None for one value)."""
  n = len(values)
  if not n:
    return float('nan'), None
  mean = sum(values) / n
  if n < 2:
    return mean, None
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var)


def _fmt(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return '' if math.isnan(value) else f'{value:.4f}'
  return cli_value(value)  # Strings as they are.


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  lines = [
    '| ' + ' | '.join(columns) + ' |',
    '|' + '|'.join(' --- ' for _ in columns) + '|',
  ]
  for row in rows:
    lines.append('| ' + ' | '.join(_fmt(row.get(c)) for c in columns) + ' |')
  return '\n'.join(lines)


def write_csv(path: str, rows: Sequence[Mapping], columns: Sequence[str]):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_fmt(row.get(c)) for c in columns])


def collect_and_write(workdir: str, out=sys.stdout) -> dict[str, str]:
  """Prints both tables and writes sweep_results.{md,csv}, sweep_summary.csv.

  Returns:
    {'markdown': path, 'csv': path, 'summary_csv': path}.
  """
  rows, summary, metrics = collect(workdir)
  keys = [c for c in rows[0] if c != 'status' and c not in metrics]
  group_keys = [k for k in keys if not is_seed_key(k)]
  point_cols = [*keys, 'status', *metrics]
  stat_cols = [*group_keys, 'n']
  for m in metrics:
    stat_cols += [f'{m} mean', f'{m} std']
  finished = sum(r['status'] == 'finished' for r in rows)
  text = (
    f'# Sweep {workdir}\n\n{finished} of {len(rows)} points finished.\n\n'
    f'## Points\n\n{markdown_table(rows, point_cols)}\n\n'
    '## Mean and sample std (ddof=1) over seeds, grouped by the other '
    f'overrides\n\n{markdown_table(summary, stat_cols)}\n'
  )
  paths = {
    'markdown': os.path.join(workdir, 'sweep_results.md'),
    'csv': os.path.join(workdir, 'sweep_results.csv'),
    'summary_csv': os.path.join(workdir, 'sweep_summary.csv'),
  }
  with open(paths['markdown'], 'w') as f:
    f.write(text)
  write_csv(paths['csv'], rows, point_cols)
  write_csv(paths['summary_csv'], summary, stat_cols)
  print(text, file=out)
  print(f'Wrote {", ".join(paths.values())}', file=out, flush=True)
  return paths


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
USAGE = (
  'usage: python -m vmoe_jsd.sweep --config=FILE[:ARG] --workdir=DIR '
  '[--parallel=N] [--dry_run] [--config.key=value ...]\n'
  '       python -m vmoe_jsd.sweep --collect --workdir=DIR'
)


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
  """Parses the sweep's command line (flags also accept `--flag value`)."""
  args: dict[str, Any] = {
    'config': None, 'workdir': None, 'parallel': 1, 'dry_run': False,
    'collect': False, 'extra': [],
  }  # fmt: skip
  items = list(argv)
  i = 0
  while i < len(items):
    arg = items[i]
    i += 1
    if arg in ('-h', '--help', '--helpfull'):
      print(__doc__.strip() + '\n\n' + USAGE)
      sys.exit(0)
    if arg.startswith('--config.'):
      args['extra'].append(arg)
      continue
    name, eq, value = arg.lstrip('-').partition('=')
    name = name.replace('-', '_')
    if not arg.startswith('-') or name not in args or name == 'extra':
      raise cli.CliError(f'unknown argument {arg!r}. {USAGE}')
    if name in ('dry_run', 'collect'):
      args[name] = value.lower() not in ('false', '0') if eq else True
      continue
    if not eq:
      if i >= len(items):
        raise cli.CliError(f'--{name} needs a value')
      value = items[i]
      i += 1
    if name == 'parallel':
      try:
        args[name] = int(value)
      except ValueError:
        raise cli.CliError(
          f'--parallel={value!r} is invalid: a positive integer'
        ) from None
    else:
      args[name] = value
  if not args['workdir']:
    raise cli.CliError(f'--workdir is required. {USAGE}')
  if not args['collect'] and not args['config']:
    raise cli.CliError(f'--config is required (or --collect). {USAGE}')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = parse_args(argv)
    if args['collect']:
      collect_and_write(args['workdir'])
      return 0
    counts = run_sweep(
      args['config'],
      args['workdir'],
      parallel=args['parallel'],
      dry_run=args['dry_run'],
      extra=args['extra'],
    )
  except cli.CliError as e:
    cli.fail(str(e))
  if not args['dry_run']:
    print(
      f'Sweep {args["workdir"]}: {counts["ran"]} ran, {counts["skipped"]} '
      f'already finished, {counts["failed"]} failed (of '
      f'{counts["points"]}). Tables: python -m vmoe_jsd.sweep --collect '
      f'--workdir={args["workdir"]}',
      flush=True,
    )
  return 1 if counts['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
