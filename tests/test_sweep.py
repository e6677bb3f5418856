"""Sweeps: get_hyper expansion, commands, skipping finished points, tables."""

import csv
import io
import json
import os
import shlex
import sys

import commands
import numpy as np
import pytest

from vmoe_jsd import cli, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
FMNIST = '/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz'


def test_hyper_product_zip_chain_follow_vmoe_semantics():
  h = sweep.Hyper()
  grid = h.product(
    [h.sweep('config.a', [1, 2]), h.sweep('config.b', ['x', 'y'])]
  )
  assert grid == [
    {'config.a': 1, 'config.b': 'x'},
    {'config.a': 1, 'config.b': 'y'},
    {'config.a': 2, 'config.b': 'x'},
    {'config.a': 2, 'config.b': 'y'},
  ]
  assert h.product([]) == [{}]
  assert h.zipit([h.sweep('a', [1, 2]), h.sweep('b', [3, 4])]) == [
    {'a': 1, 'b': 3},
    {'a': 2, 'b': 4},
  ]
  with pytest.raises(cli.CliError, match='equal length'):
    h.zipit([h.sweep('a', [1, 2]), h.sweep('b', [3])])
  assert h.chainit([h.fixed('a', 1), h.sweep('b', [2])]) == [{'a': 1}, {'b': 2}]


def test_point_names_and_command_values():
  point = {
    'consistency.weight': 0.1,
    'seed': 2,
    'consistency.layers': (1,),
    'model.variant': 'S/32',
  }
  assert sweep.point_name(point) == (
    'consistency.weight=0.1,seed=2,consistency.layers=(1,),model.variant=S_32'
  )
  cmd = sweep.point_command('c.py:runlocal', 'w/p', point)
  assert cmd[1:] == [
    '-m',
    'vmoe_jsd.main',
    '--config=c.py:runlocal',
    '--workdir=w/p',
    '--config.consistency.weight=0.1',
    '--config.seed=2',
    '--config.consistency.layers=(1,)',
    '--config.model.variant=S/32',
  ]


def test_default_sweep_dry_run_prints_six_commands(tmp_path):
  out = io.StringIO()
  counts = (
    sweep.run_sweep(
      os.path.join(ROOT, 'configs', 'default.py:runlocal'),
      str(tmp_path / 'sw'),
      dry_run=True,
      out=out,
      extra=['--config.report_progress.every_steps=10'],
    )
    if os.path.exists(FMNIST)
    else None
  )
  if counts is None:
    pytest.skip('needs Fashion-MNIST (./setup.sh --data) to validate')
  lines = out.getvalue().splitlines()
  assert counts == {'points': 6, 'skipped': 0, 'ran': 0, 'failed': 0}
  assert len(lines) == 6
  assert lines[0].endswith(
    f'--workdir={tmp_path}/sw/consistency.weight=0.0,seed=0 '
    '--config.report_progress.every_steps=10 '
    '--config.consistency.weight=0.0 --config.seed=0'
  )
  assert not os.path.exists(tmp_path / 'sw')  # a dry run writes nothing


def test_a_bad_point_fails_before_any_run(tmp_path):
  cfg = tmp_path / 'bad.py'
  cfg.write_text(
    f'import sys\nsys.path.insert(0, {TESTS!r})\n'
    'from smoke_config import get_config  # noqa\n'
    'def get_hyper(hyper):\n'
    "  return hyper.sweep('config.optimizer.learning_rate.peak_value',"
    ' [1e-3, -1.0])\n'
  )
  with pytest.raises(cli.CliError) as e:
    sweep.run_sweep(str(cfg), str(tmp_path / 'sw'))
  assert str(e.value) == (
    'sweep point optimizer.learning_rate.peak_value=-1.0: '
    'config.optimizer.learning_rate.peak_value=-1.0 is invalid: must be a '
    'number > 0'
  )
  assert not os.path.exists(tmp_path / 'sw')
  cfg.write_text('def get_config():\n  return None\n')
  with pytest.raises(cli.CliError, match='defines no get_hyper'):
    sweep.run_sweep(str(cfg), str(tmp_path / 'sw'))


def _fake_point(workdir, name, overrides, accuracy, kappa, finished=True):
  path = os.path.join(workdir, name)
  os.makedirs(path)
  with open(os.path.join(path, sweep.POINT_FILE), 'w') as f:
    json.dump(overrides, f)
  result = {
    'accuracy': accuracy,
    'step': 10 if finished else 5,
    'num_train_steps': 10,
    'routing': {
      'encoderblock_1': {
        'agreement': 0.5,
        'kappa': kappa,
        'jsd': 0.01,
        'confidence': 0.4,
        'entropy_fraction': 0.9,
        'dropped': 0.0,
      }
    },
  }
  with open(os.path.join(path, 'results.json'), 'w') as f:
    json.dump(result, f)


def test_collect_means_and_sample_stds_over_seeds(tmp_path):
  acc = {
    (0.0, 0): 0.80,
    (0.0, 1): 0.82,
    (0.0, 2): 0.87,
    (0.1, 0): 0.85,
    (0.1, 1): 0.81,
  }
  for (w, s), a in acc.items():
    _fake_point(
      str(tmp_path), f'w={w},seed={s}', {'w': w, 'seed': s}, a, kappa=a / 2
    )
  _fake_point(
    str(tmp_path),
    'w=0.1,seed=2',
    {'w': 0.1, 'seed': 2},
    0.1,
    kappa=0.0,
    finished=False,
  )
  out = io.StringIO()
  paths = sweep.collect_and_write(str(tmp_path), out=out)
  with open(paths['csv']) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6
  assert [r['status'] for r in rows].count('missing') == 1
  with open(paths['summary_csv']) as f:
    groups = {r['w']: r for r in csv.DictReader(f)}
  for w in ('0.0', '0.1'):
    values = [a for (ww, _), a in acc.items() if str(ww) == w]
    assert int(groups[w]['n']) == len(values)
    assert float(groups[w]['accuracy mean']) == pytest.approx(
      np.mean(values), abs=1e-4
    )
    assert float(groups[w]['accuracy std']) == pytest.approx(
      np.std(values, ddof=1), abs=1e-4
    )
    assert float(groups[w]['block1.kappa mean']) == pytest.approx(
      np.mean(values) / 2, abs=1e-4
    )
  text = out.getvalue()
  assert '5 of 6 points finished' in text
  assert '| w | seed | status | accuracy |' in text


def _run_sweep_cli(*args):
  """The sweep command; one CPU device per point, as a user's run."""
  return commands.run(commands.module('vmoe_jsd.sweep', *args), timeout=1200)


def _check_sweep(config, workdir, num_points, group_key, *extra):
  proc = _run_sweep_cli(f'--config={config}', f'--workdir={workdir}', *extra)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f'{num_points} ran, 0 already finished, 0 failed' in proc.stdout
  for name in os.listdir(workdir):
    if os.path.isdir(os.path.join(workdir, name)):
      with open(os.path.join(workdir, name, 'run.log')) as f:
        log = f.read()
      assert 'Traceback' not in log and 'logging_writer' not in log, log
  again = _run_sweep_cli(f'--config={config}', f'--workdir={workdir}', *extra)
  assert again.returncode == 0, again.stderr
  assert f'0 ran, {num_points} already finished' in again.stdout
  assert 'start ' not in again.stdout
  coll = _run_sweep_cli('--collect', f'--workdir={workdir}')
  assert coll.returncode == 0, coll.stderr
  with open(os.path.join(workdir, 'sweep_results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == num_points
  assert all(r['status'] == 'finished' for r in rows)
  with open(os.path.join(workdir, 'sweep_summary.csv')) as f:
    groups = list(csv.DictReader(f))
  for group in groups:
    accs = [
      float(r['accuracy']) for r in rows if r[group_key] == group[group_key]
    ]
    assert float(group['accuracy mean']) == pytest.approx(
      np.mean(accs), abs=1e-4
    )
    assert float(group['accuracy std']) == pytest.approx(
      np.std(accs, ddof=1), abs=1e-4
    )
  assert f'| {group_key} | n | accuracy mean | accuracy std |' in coll.stdout
  return rows, groups


@pytest.mark.processes
def test_sweep_runs_points_skips_them_again_and_collects(tmp_path):
  """Two points of the smoke config (2 steps each), two at a time."""
  cfg = tmp_path / 'sweep_smoke.py'
  cfg.write_text(
    f'import sys\nsys.path.insert(0, {TESTS!r})\n'
    'from smoke_config import get_config  # noqa\n'
    'def get_hyper(hyper):\n'
    "  return hyper.product([hyper.sweep('config.consistency.weight', [0.5]),"
    " hyper.sweep('config.seed', [0, 1])])\n"
  )
  rows, groups = _check_sweep(
    str(cfg),
    str(tmp_path / 'sw'),
    2,
    'consistency.weight',
    '--parallel=2',
    '--config.num_train_steps=2',
  )
  assert len(groups) == 1 and groups[0]['n'] == '2'
  assert sorted(n for n in os.listdir(tmp_path / 'sw') if '=' in n) == [
    'consistency.weight=0.5,seed=0',
    'consistency.weight=0.5,seed=1',
  ]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FMNIST), reason='needs Fashion-MNIST')
def test_acceptance_default_runlocal_sweep(tmp_path):
  """Issue 9's acceptance: 6 points; again none; 6 rows + per-weight stats."""
  rows, groups = _check_sweep(
    os.path.join(ROOT, 'configs', 'default.py:runlocal'),
    str(tmp_path / 'sw'),
    6,
    'consistency.weight',
  )
  assert sorted(g['consistency.weight'] for g in groups) == ['0.0', '0.1']
  assert all(g['n'] == '3' for g in groups)


def test_dry_run_skips_finished_points_and_reruns_incomplete_ones(tmp_path):
  cfg = tmp_path / 'two.py'
  cfg.write_text(
    f'import sys\nsys.path.insert(0, {TESTS!r})\n'
    'from smoke_config import get_config  # noqa\n'
    'def get_hyper(hyper):\n'
    "  return hyper.sweep('config.seed', [0, 1, 2])\n"
  )
  workdir = str(tmp_path / 'sw')
  _fake_point(workdir, 'seed=0', {'seed': 0}, 0.5, 0.1)  # 10 of 10 steps
  _fake_point(workdir, 'seed=1', {'seed': 1}, 0.5, 0.1, finished=False)
  out = io.StringIO()
  # The smoke config trains 6 steps; a 10-step result is not this point's.
  counts = sweep.run_sweep(
    str(cfg),
    workdir,
    dry_run=True,
    out=out,
    extra=['--config.num_train_steps=10'],
  )
  lines = out.getvalue().splitlines()
  assert counts['skipped'] == 1
  assert lines[0] == f'# finished, skipped: {workdir}/seed=0'
  assert [x.split('--workdir=')[1].split()[0] for x in lines[1:]] == [
    f'{workdir}/seed=1',
    f'{workdir}/seed=2',
  ]
  out = io.StringIO()
  counts = sweep.run_sweep(str(cfg), workdir, dry_run=True, out=out)
  assert counts['skipped'] == 0  # 6-step config: the 10-step run differs


def _touch(path, code=0):
  """A command that creates `path` (unless code != 0) and exits `code`."""
  body = f'open({path!r}, "w").close()' if code == 0 else 'pass'
  return (sys.executable, '-c', f'import sys; {body}; sys.exit({code})')


def test_run_jobs_runs_follow_ups_in_order_and_skips_what_is_done(tmp_path):
  def job(name, analyze_code):
    workdir = str(tmp_path / name)
    train = _touch(os.path.join(workdir, 'trained'))
    analyze = _touch(os.path.join(workdir, 'analysis.json'), analyze_code)
    return sweep.Job(
      name,
      workdir,
      (
        sweep.follow_up('train', train, workdir, ['trained']),
        sweep.follow_up('analyze', analyze, workdir, ['analysis.json']),
      ),
    )

  jobs = [job('ok', 0), job('bad', 3)]
  out = io.StringIO()
  outcomes = sweep.run_jobs(jobs, parallel=2, out=out)
  assert [status for status, _ in outcomes] == ['ran', 'failed']
  assert set(outcomes[0][1]) == {'train', 'analyze'}
  assert set(outcomes[1][1]) == {'train'}  # Trained, then analyze failed.
  assert 'bad: FAILED (exit 3)' in out.getvalue()
  assert os.path.exists(tmp_path / 'ok' / 'train_log.txt')
  # Again: 'ok' is done; 'bad' runs only its analyze, which fails again.
  out = io.StringIO()
  outcomes = sweep.run_jobs(jobs, out=out)
  assert [status for status, _ in outcomes] == ['skipped', 'failed']
  started = [x for x in out.getvalue().splitlines() if x.startswith('start')]
  assert started == [f'start bad: {shlex.join(jobs[1].commands[1].argv)}']
  # A dry run prints the pending commands only, and runs nothing.
  out = io.StringIO()
  outcomes = sweep.run_jobs(jobs, dry_run=True, out=out)
  assert [status for status, _ in outcomes] == ['skipped', 'dry_run']
  assert out.getvalue().splitlines() == [
    f'# finished, skipped: {tmp_path}/ok',
    shlex.join(jobs[1].commands[1].argv),
  ]
  with pytest.raises(cli.CliError, match='--parallel=0 is invalid'):
    sweep.run_jobs(jobs, parallel=0)
