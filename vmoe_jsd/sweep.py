r"""Hyperparameter sweeps over a config's `get_hyper(hyper)`, and their tables.

  python -m vmoe_jsd.sweep --config=configs/default.py[:runlocal] \
      --workdir=runs/name [--parallel=N] [--dry_run] [--config.key=value ...]
  python -m vmoe_jsd.sweep --collect --workdir=runs/name

`get_hyper(hyper)` returns a list of points, each a dict of overrides
{'config.key': value}, built with vmoe's vocabulary (class Hyper). Every
point is validated first, then trains in `<workdir>/<key>=<value>,...`;
finished points are skipped; `--collect` writes the tables. Details:
docs/configuration.md#sweeps. As a library, `run_jobs` runs Jobs (a point's
training and follow-up commands, each skipped once its work is done).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import importlib.util
import itertools
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vmoe_jsd import cli, run_files

MANIFEST = 'sweep.json'
POINT_FILE = 'sweep_point.json'
Point = dict[str, Any]


# get_hyper vocabulary.
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
  return [{k.removeprefix('config.'): v for k, v in p.items()} for p in points]


# Points -> names, command lines.
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
  head = [sys.executable, '-m', 'vmoe_jsd.main', f'--config={config_arg}']
  return [*head, f'--workdir={workdir}', *override_flags(point, extra)]


def override_flags(
  point: Mapping[str, Any], extra: Sequence[str] = ()
) -> list[str]:
  """`extra`, then `--config.<key>=<value>` per override of `point`."""
  return [*extra, *(f'--config.{k}={cli_value(v)}' for k, v in point.items())]


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
      flags = override_flags(point, extra)
      config = cli.load_config(['sweep', f'--config={config_arg}', *flags])
      cli.check_config(config, int(config.get('num_expert_partitions', 1)))
    except cli.CliError as e:
      raise cli.CliError(f'sweep point {point_name(point)}: {e}') from None
    steps.append(int(config.get('num_train_steps') or 0) or None)
  return steps


# The runner: jobs of commands, each skipped once its work is done.
@dataclasses.dataclass(frozen=True)
class Command:
  """One subprocess of a job, logging to `log` (appended).

  `name` ('train', 'analyze', ...) keys its time in run_jobs' seconds;
  `done()` says whether its work is there: then it is skipped, and when
  false after it exited 0, it has failed.
  """

  name: str
  argv: tuple[str, ...]
  log: str
  done: Callable[[], bool]


@dataclasses.dataclass(frozen=True)
class Job:
  """A point: its commands (training, then follow-ups) run in order, the
  first failure ending it; `name` is shown in progress lines."""

  name: str
  workdir: str
  commands: tuple[Command, ...]


def train_command(config_arg, workdir, point, extra=(), num_steps=None):
  """Training `point` in workdir (log: run.log); done once its results.json
  is complete (for `num_steps` steps when given)."""
  return Command(
    'train',
    tuple(point_command(config_arg, workdir, point, extra)),
    os.path.join(workdir, 'run.log'),
    lambda: run_files.finished_result(workdir, num_steps) is not None,
  )


def follow_up(name: str, argv, workdir: str, outputs: Sequence[str]):
  """A command on a trained point (log: workdir/<name>_log.txt); done once
  all `outputs` (files in workdir) exist."""
  paths = [os.path.join(workdir, x) for x in outputs]
  log = os.path.join(workdir, f'{name}_log.txt')
  return Command(
    name, tuple(argv), log, lambda: all(os.path.exists(p) for p in paths)
  )


def run_jobs(
  jobs: Sequence[Job], *, parallel=1, dry_run=False, title='Sweep', out=None
) -> list[tuple[str, dict[str, float]]]:
  """Runs the pending commands of `jobs`, `parallel` jobs at a time.

  Jobs whose commands are all done are skipped, so the same call resumes
  an interrupted sweep; `dry_run` prints the pending commands instead.

  Returns:
    Per job, (status, seconds): status 'skipped' (nothing to do), 'dry_run',
    'ran' or 'failed'; seconds: the wall time of each command that ran and
    succeeded, by name.
  """
  if parallel < 1:
    raise cli.CliError(f'--parallel={parallel} is invalid: must be >= 1')
  out = out or sys.stdout
  pending = [_pending(job) for job in jobs]
  todo = [i for i, commands in enumerate(pending) if commands]
  if dry_run:
    for job, commands in zip(jobs, pending, strict=True):
      if not commands:
        print(f'# finished, skipped: {job.workdir}', file=out)
      for command in commands:
        print(shlex.join(command.argv), file=out)
    return [('dry_run' if p else 'skipped', {}) for p in pending]
  outcomes = [('skipped', {}) for _ in jobs]
  print(
    f'{title}: {len(jobs)} points, {len(jobs) - len(todo)} finished, '
    f'{len(todo)} to run ({parallel} at a time).',
    file=out,
    flush=True,
  )
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = {pool.submit(_run_job, jobs[i], out): i for i in todo}
    done = concurrent.futures.as_completed(futures)
    for count, future in enumerate(done, 1):
      i = futures[future]
      status, seconds, line = future.result()
      outcomes[i] = status, seconds
      _say(out, f'[{count}/{len(todo)}] {jobs[i].name}: {line}')
  return outcomes


def _say(out, line: str) -> None:
  """One progress line in one write (jobs run in threads)."""
  out.write(line + '\n')
  out.flush()


def _pending(job: Job) -> list[Command]:
  return [c for c in job.commands if not c.done()]


def _run_job(job: Job, out) -> tuple[str, dict[str, float], str]:
  """Runs the job's pending commands: status, seconds, what happened."""
  seconds, t0 = {}, time.time()
  for command in _pending(job):
    os.makedirs(os.path.dirname(command.log), exist_ok=True)
    _say(out, f'start {job.name}: {shlex.join(command.argv)}')
    start = time.time()
    with open(command.log, 'a') as log:
      code = subprocess.call(command.argv, stdout=log, stderr=subprocess.STDOUT)
    if code or not command.done():
      took = time.time() - t0
      why = f'see {command.log}: {_last_line(command.log)}'
      return 'failed', seconds, f'FAILED (exit {code}) after {took:.0f}s; {why}'
    seconds[command.name] = time.time() - start
  result = run_files.finished_result(job.workdir)
  accuracy = f', accuracy {result["accuracy"]:.4f}' if result else ''
  return 'ran', seconds, f'done in {time.time() - t0:.0f}s{accuracy}'


def _last_line(path: str) -> str:
  with open(path) as f:  # The command's log: there once it has run.
    lines = [x.strip() for x in f if x.strip()]
  return lines[-1][:300] if lines else '(empty log)'


def run_sweep(
  config_arg: str,
  workdir: str,
  *,
  parallel: int = 1,
  dry_run: bool = False,
  extra: Sequence[str] = (),
  out=sys.stdout,
) -> dict[str, int]:
  """Runs the unfinished points of `config_arg`'s (FILE[:ARG]) get_hyper,
  each in workdir/<point name>, `parallel` at a time, with the overrides
  `extra` (`--config.key=value`) first; a dry run prints the commands.

  Returns:
    Counts: {'points', 'skipped', 'ran', 'failed'}.
  """
  points = load_points(config_arg)
  names = [point_name(p) for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise cli.CliError(f'get_hyper gives the same point twice: {dupes}')
  steps = check_points(config_arg, points, extra)
  jobs = []
  for point, name, num_steps in zip(points, names, steps, strict=True):
    point_dir = os.path.join(workdir, name)
    train = train_command(config_arg, point_dir, point, extra, num_steps)
    jobs.append(Job(name, point_dir, (train,)))
  if not dry_run:
    manifest = []
    for job, point in zip(jobs, points, strict=True):
      os.makedirs(job.workdir, exist_ok=True)
      run_files.write_json(os.path.join(job.workdir, POINT_FILE), point)
      manifest.append({'name': job.name, 'overrides': point})
    run_files.write_json(
      os.path.join(workdir, MANIFEST),
      {'config': config_arg, 'extra': list(extra), 'points': manifest},
    )
  outcomes = run_jobs(
    jobs, parallel=parallel, dry_run=dry_run, title=f'Sweep {workdir}', out=out
  )
  statuses = [status for status, _ in outcomes]
  counts = {k: statuses.count(k) for k in ('skipped', 'ran', 'failed')}
  return {'points': len(points), **counts}


# Collecting.
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
  keys = list(dict.fromkeys(k for _, overrides in points for k in overrides))
  rows, metric_names = [], []
  for name, overrides in points:
    row = {k: cli_value(overrides[k]) if k in overrides else '' for k in keys}
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
    out = {**{k: members[0][k] for k in group_keys}, 'n': len(members)}
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
  stats = [f'{m} {s}' for m in metrics for s in ('mean', 'std')]
  stat_cols = [*group_keys, 'n', *stats]
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


# Command line.
USAGE = (
  'usage: python -m vmoe_jsd.sweep --config=FILE[:ARG] --workdir=DIR '
  '[--parallel=N] [--dry_run] [--config.key=value ...]\n'
  '       python -m vmoe_jsd.sweep --collect --workdir=DIR'
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses the sweep's command line (flags also accept `--flag value`)."""
  parser = argparse.ArgumentParser(
    add_help=False, allow_abbrev=False, exit_on_error=False
  )
  parser.add_argument('--config')
  parser.add_argument('--workdir')
  parser.add_argument('--parallel', type=int, default=1)
  for name in ('--dry_run', '--collect'):  # Also --name=false, as absl.
    is_true = lambda v: v.lower() not in ('false', '0')
    parser.add_argument(name, nargs='?', const=True, type=is_true)
  parser.add_argument('-h', '--help', '--helpfull', action='store_true')
  try:
    args, unknown = parser.parse_known_args(argv)
  except argparse.ArgumentError as e:
    raise cli.CliError(f'{e}. {USAGE}') from None
  if args.help:
    print(__doc__.strip() + '\n\n' + USAGE)
    sys.exit(0)
  for arg in unknown:
    if not arg.startswith('--config.'):
      raise cli.CliError(f'unknown argument {arg!r}. {USAGE}')
  if not args.workdir:
    raise cli.CliError(f'--workdir is required. {USAGE}')
  if not args.collect and not args.config:
    raise cli.CliError(f'--config is required (or --collect). {USAGE}')
  args.dry_run, args.extra = bool(args.dry_run), unknown
  return args


def main(argv: Sequence[str] | None = None) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.collect:
      collect_and_write(args.workdir)
      return 0
    options = dict(parallel=args.parallel, dry_run=args.dry_run)
    counts = run_sweep(args.config, args.workdir, extra=args.extra, **options)
  except cli.CliError as e:
    cli.fail(str(e))
  if not args.dry_run:
    print(
      f'Sweep {args.workdir}: {counts["ran"]} ran, {counts["skipped"]} '
      f'already finished, {counts["failed"]} failed (of {counts["points"]}). '
      f'Tables: python -m vmoe_jsd.sweep --collect --workdir={args.workdir}',
      flush=True,
    )
  return 1 if counts['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
