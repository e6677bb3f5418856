"""The workdir: locked while a run uses it, kept to one config across
resumes, strict JSON in every file, the history written as it goes (a
crashed run resumes as if it never crashed), and a one-line failure when
the workdir, the disk or the checkpoints fail."""

import contextlib
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import commands
import jax
import numpy as np
import pytest
import smoke_config

from vmoe_jsd import checkpoints, cli, paths, run_files, train
from vmoe_jsd.config_errors import flatten
from vmoe_jsd.data import arrays

ROOT = commands.ROOT


def _smoke(**overrides):
  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


def _strict_loads(text):
  """json.loads that rejects NaN and +-Infinity (RFC 8259 JSON only)."""

  def refuse(name):
    raise ValueError(f'not strict JSON: {name}')

  return json.loads(text, parse_constant=refuse)


def _main(*args, workdir, wait=True):
  command = commands.module(
    'vmoe_jsd.main', f'--config={commands.SMOKE}', f'--workdir={workdir}', *args
  )
  if not wait:
    return commands.start(command, merge=False)
  return commands.run(command)


def _one_error_line(stderr, start):
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  assert lines[0].startswith(f'vmoe_jsd.main: error: {start}'), stderr
  return lines[0]


# ----------------------------------------------------------------------------
# Strict JSON.
# ----------------------------------------------------------------------------
def test_results_with_nan_and_infinity_are_strict_json(tmp_path):
  result = {
    'accuracy': float('nan'),
    'routing': {
      'encoderblock_1': {
        'kappa': float('-inf'),
        'jsd': 0.25,
        'load': (0.5, float('inf'), 0.5),
      }
    },
    'loss': np.float32('nan'),
    'steps': np.int64(7),
    'ok': np.bool_(True),
    'curve': np.array([1.0, np.nan]),
  }
  path = tmp_path / 'results.json'
  paths.write_json(path, result)
  back = _strict_loads(path.read_text())
  assert back == {
    'accuracy': None,
    'routing': {
      'encoderblock_1': {'kappa': None, 'jsd': 0.25, 'load': [0.5, None, 0.5]}
    },
    'loss': None,
    'steps': 7,
    'ok': True,
    'curve': [1.0, None],
  }
  run_files.append_jsonl(tmp_path / 'h.jsonl', [{'step': 1, 'xent': math.nan}])
  lines = (tmp_path / 'h.jsonl').read_text().splitlines()
  assert [_strict_loads(x) for x in lines] == [{'step': 1, 'xent': None}]


# Files owned by other work that still call json.dump without
# allow_nan=False (remove each once it writes through paths.dumps_json).
PENDING_STRICT_JSON = {
  'vmoe_jsd/inspect_step.py',
}


def _json_calls(text):
  """The argument text of every json.dump( / json.dumps( call."""
  for match in re.finditer(r'json\.dumps?\(', text):
    depth, i = 1, match.end()
    while depth and i < len(text):
      depth += {'(': 1, ')': -1}.get(text[i], 0)
      i += 1
    yield text[match.end() : i - 1]


def test_every_json_write_of_the_project_is_strict():
  found = []
  for folder in ('vmoe_jsd', 'tools'):
    for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in names:
        if not name.endswith('.py'):
          continue
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, ROOT)
        with open(path) as f:
          text = f.read()
        if any('allow_nan=False' not in a for a in _json_calls(text)):
          found.append(rel)
  assert sorted(set(found) - PENDING_STRICT_JSON) == []


# ----------------------------------------------------------------------------
# The lock.
# ----------------------------------------------------------------------------
def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  first = run_files.WorkdirLock(tmp_path).acquire()
  with pytest.raises(run_files.WorkdirInUseError) as e:
    run_files.WorkdirLock(tmp_path).acquire()
  text = str(e.value)
  assert '\n' not in text
  assert text.startswith(
    f'--workdir={tmp_path} is in use by another run '
    f'(pid {os.getpid()} on {os.uname().nodename}, '
    'started 20'
  )
  assert 'command: ' in text
  first.release()
  run_files.WorkdirLock(tmp_path).acquire().release()  # Free again.


HOLD = """
import os, sys, time
from vmoe_jsd import run_files
workdir, barrier, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if n:  # Wait until all n processes are ready, then all try at once.
  open(os.path.join(barrier, str(os.getpid())), 'w').close()
  while len(os.listdir(barrier)) < n:
    time.sleep(0.001)
try:
  lock = run_files.WorkdirLock(workdir).acquire()
  print('locked', flush=True)
except run_files.WorkdirInUseError as e:
  print('refused', e, flush=True)
  sys.exit(3)
time.sleep(300)  # Held until the test kills this process.
"""


def _hold(workdir, barrier='', n=0):
  return commands.start(
    [sys.executable, '-c', HOLD, str(workdir), str(barrier), str(n)],
    merge=False,
  )


@pytest.mark.processes  # A process that holds the lock, then is killed.
def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
  holder = _hold(tmp_path)
  assert holder.stdout.readline().strip() == 'locked', holder.stderr.read()
  with pytest.raises(run_files.WorkdirInUseError, match=f'pid {holder.pid} '):
    run_files.WorkdirLock(tmp_path).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  assert holder.returncode == -signal.SIGKILL
  # The file is still there, naming the dead holder; the lock is not.
  assert (
    json.loads((tmp_path / run_files.LOCK).read_text())['pid'] == holder.pid
  )
  run_files.WorkdirLock(tmp_path).acquire().release()


@pytest.mark.processes  # Four processes try to lock at once.
def test_runs_started_at_the_same_moment_exactly_one_locks(tmp_path):
  """Four processes try at once (a file barrier); the winner holds the
  lock until all have answered."""
  barrier = tmp_path / 'barrier'
  os.makedirs(barrier)
  procs = [_hold(tmp_path / 'run', barrier, 4) for _ in range(4)]
  os.makedirs(tmp_path / 'run')
  firsts = [p.stdout.readline() for p in procs]  # Each answers once.
  for p, line in zip(procs, firsts, strict=True):
    if line.startswith('locked'):
      p.kill()  # The others exit by themselves.
    p.communicate(timeout=60)
  words = [line.strip().split(' ', 1)[0] for line in firsts]
  assert sorted(words) == ['locked', 'refused', 'refused', 'refused'], firsts
  winner = procs[words.index('locked')].pid
  for p, line in zip(procs, firsts, strict=True):
    if p.pid != winner:
      assert p.returncode == 3 and f'(pid {winner} on ' in line, line


def test_a_remote_workdir_is_not_locked_and_says_so():
  lines = []
  with run_files.lock_workdir('gs://bucket/run', log=lines.append):
    pass
  assert lines == [
    'WARNING: gs://bucket/run is not locked (remote workdirs cannot be): '
    'never start two runs on it at once.'
  ]


@pytest.mark.slow  # One smoke run and a refused one, as two processes.
def test_two_mains_at_once_one_trains_the_other_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  procs = [_main(workdir=workdir, wait=False) for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], outs
  refused = outs[[p.returncode for p in procs].index(2)]
  winner = procs[[p.returncode for p in procs].index(0)].pid
  _one_error_line(
    refused[1],
    f'--workdir={workdir} is in use by another run (pid {winner} on ',
  )
  assert run_files.finished_result(str(workdir)) is not None


# ----------------------------------------------------------------------------
# A resume keeps its config.
# ----------------------------------------------------------------------------
def _trained_workdir(tmp_path, config):
  """A workdir as a run leaves it: config.json and a checkpoint folder."""
  run_files.write_config(tmp_path, config)
  os.makedirs(tmp_path / 'checkpoints' / '4')
  return tmp_path


def test_a_resume_with_another_config_is_refused_listing_the_keys(tmp_path):
  old = _smoke().to_dict()
  workdir = _trained_workdir(tmp_path, old)
  new = _smoke(
    **{
      'seed': 1,
      'optimizer.learning_rate.peak_value': 0.01,
      'num_train_steps': 8,
    }
  ).to_dict()
  with pytest.raises(run_files.ConfigChangedError) as e:
    run_files.check_resume_config(workdir, new)
  text = str(e.value)
  assert '\n' not in text
  assert text.startswith(f'--workdir={workdir} was trained with another config')
  assert 'optimizer.learning_rate.peak_value: 0.001 -> 0.01; seed: 0 -> 1.' in (
    text
  )
  assert 'num_train_steps' not in text  # It may change.
  assert '--allow_config_change' in text
  assert not (workdir / run_files.CONFIG_CHANGES).exists()


def test_keys_that_may_change_on_resume_are_logged_and_recorded(tmp_path):
  workdir = _trained_workdir(tmp_path, _smoke().to_dict())
  changed = {
    'num_train_steps': 12,
    'report_progress.every_steps': 3,
    'save_checkpoint.every_steps': 5,
    'evaluate.every_steps': 4,
    'dataset.train.data_dir': '/elsewhere',
    'num_expert_partitions': 2,
    'profile.num_steps': 2,
  }
  lines = []
  changes = run_files.check_resume_config(
    workdir, _smoke(**changed).to_dict(), log=lines.append
  )
  assert sorted(changes) == sorted(changed)
  assert changes['num_train_steps'] == (6, 12)
  # The synthetic data has no data_dir key: an added key, named apart.
  assert changes['dataset.train.data_dir'] == ('<absent>', '/elsewhere')
  assert len(lines) == 2 and lines[0].startswith('Resuming with: ')
  assert 'dataset.train.data_dir' not in lines[0]
  assert lines[1] == (
    'Resuming with 1 key(s) that only one of config.json '
    'and this config has (options added or removed since): '
    'dataset.train.data_dir.'
  )
  (row,) = run_files.read_jsonl(workdir / run_files.CONFIG_CHANGES)
  assert row['forced'] is False
  assert row['changes']['num_train_steps'] == {'old': 6, 'new': 12}


def test_allow_config_change_resumes_and_records_it_as_forced(tmp_path):
  workdir = _trained_workdir(tmp_path, _smoke().to_dict())
  lines = []
  run_files.check_resume_config(
    workdir, _smoke(seed=3).to_dict(), allow_change=True, log=lines.append
  )
  assert lines == [
    'WARNING: resuming with a changed config '
    '(--allow_config_change): seed: 0 -> 3.'
  ]
  (row,) = run_files.read_jsonl(workdir / run_files.CONFIG_CHANGES)
  assert row['forced'] is True and row['changes'] == {
    'seed': {'old': 0, 'new': 3}
  }


def test_without_a_checkpoint_nothing_is_reused_or_compared(tmp_path):
  run_files.write_config(tmp_path, _smoke().to_dict())
  os.makedirs(tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp-1')
  assert run_files.check_resume_config(tmp_path, _smoke(seed=5).to_dict()) == {}


def test_options_the_code_gained_since_are_named_not_refused(tmp_path):
  """A workdir trained before the code had an option: its config.json
  lacks the key, which is accepted (and named); a changed value is not."""
  old = _smoke().to_dict()
  num_keys = 1 + len(flatten(old['evaluate']['stability']))
  del old['microsteps'], old['evaluate']['stability']
  workdir = _trained_workdir(tmp_path, old)
  lines = []
  changes = run_files.check_resume_config(
    workdir, _smoke().to_dict(), log=lines.append
  )
  assert changes['microsteps'] == ('<absent>', 1)
  assert 'evaluate.stability.limit' in changes
  assert lines == [lines[0]]
  assert lines[0].startswith(f'Resuming with {num_keys} key(s) that only')
  with pytest.raises(run_files.ConfigChangedError, match='mixup.concentration'):
    run_files.check_resume_config(
      workdir, _smoke(**{'mixup.concentration': 0.2}).to_dict()
    )


def test_a_key_the_old_config_lacks_is_a_change():
  old = {'a': 1, 'b': {'c': (1, 2)}}
  new = {'a': 1, 'b': {'c': [1, 2], 'd': 0.5}}
  assert run_files.config_changes(old, new) == {'b.d': ('<absent>', 0.5)}
  assert run_files.may_change_on_resume('dataset.test.data_dir')
  assert run_files.may_change_on_resume('fewshot.datasets.pets.train.data_dir')
  assert not run_files.may_change_on_resume('dataset.train.batch_size')
  assert not run_files.may_change_on_resume('seed')


# ----------------------------------------------------------------------------
# The history, written as it goes; the training time across segments.
# ----------------------------------------------------------------------------
def _read_history(workdir):
  with open(os.path.join(workdir, run_files.HISTORY)) as f:
    return [_strict_loads(line) for line in f]


def _final_params(workdir):
  ckpt = checkpoints.Checkpointer(workdir, every_steps=2)
  params = ckpt._manager.restore(6)['state']['params']
  ckpt.close()
  return params


@pytest.mark.slow
def test_crashed_run_resumes_as_uninterrupted_and_keeps_its_history(
  tmp_path, monkeypatch, reference
):
  """A run dies before step 6 (rows 1-5 written as it went, checkpoint 4
  saved); a resume with another seed is refused before it touches
  anything; the resume proper keeps rows 1-4, trains 5 and 6 again, adds
  the first segment's training time, and ends with the parameters of a run
  that never crashed: data order and random streams are functions of the
  step."""
  config = _smoke(**smoke_config.REFERENCE)
  crashing = smoke_config.crash_before_step(6)
  workdir = str(tmp_path / 'crashed')
  with monkeypatch.context() as m:
    m.setattr(arrays.ArrayDataset, 'train_batches', crashing)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4']
  first = _read_history(workdir)
  assert [r['step'] for r in first] == [1, 2, 3, 4, 5]
  assert first[0]['train_seconds'] == 0.0  # Step 1 is compilation.
  assert all(r['train_seconds'] > 0 for r in first[1:])

  with pytest.raises(run_files.ConfigChangedError, match='seed: 0 -> 1'):
    train.train_and_evaluate(_smoke(seed=1, **smoke_config.REFERENCE), workdir)
  assert _read_history(workdir) == first

  resumed = train.train_and_evaluate(config, workdir)
  rows = _read_history(workdir)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert rows[:4] == first[:4]
  # Step 5 is the resumed segment's compilation: no time of its own.
  assert rows[4]['train_seconds'] == rows[3]['train_seconds']
  assert rows[5]['train_seconds'] > rows[4]['train_seconds']
  assert resumed['train_seconds_excluding_compile'] == rows[5]['train_seconds']
  with open(os.path.join(workdir, run_files.RESULTS)) as f:
    assert _strict_loads(f.read())['step'] == 6
  jax.tree_util.tree_map(
    np.testing.assert_array_equal,
    _final_params(reference.workdir),
    _final_params(workdir),
  )
  assert resumed['accuracy'] == reference.result['accuracy']


def test_a_cut_last_line_is_dropped_on_resume(tmp_path):
  path = tmp_path / run_files.HISTORY
  path.write_text(
    '{"step": 1, "train_seconds": 0.0}\n'
    '{"step": 2, "train_seconds": 1.5, "images_per_second": 8}\n'
    '{"step": 3, "trai'
  )
  history = run_files.History(path, start_step=4)
  assert [r['step'] for r in history] == [1, 2]
  # Steps 3 and 4 are counted at step 2's rate: 2 steps of 8 images / 8 /s.
  assert history.train_seconds_until(4, batch_size=8) == pytest.approx(3.5)
  history.append({'step': 5})
  assert [r['step'] for r in run_files.read_jsonl(path)] == [1, 2, 5]


@pytest.mark.slow  # A run killed with SIGKILL, then resumed (two processes).
def test_kill_9_keeps_the_reported_rows_and_the_lock_is_free(tmp_path):
  workdir = tmp_path / 'run'
  history_path = workdir / run_files.HISTORY
  args = [
    '--config.num_train_steps=300',
    '--config.save_checkpoint.every_steps=20',
  ]
  proc = _main(*args, workdir=workdir, wait=False)
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if history_path.exists() and history_path.read_text().count('\n') >= 30:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  rows = [_strict_loads(x) for x in history_path.read_text().splitlines()]
  assert [r['step'] for r in rows] == list(range(1, len(rows) + 1))
  again = _main(*args, workdir=workdir)
  assert again.returncode == 0, again.stderr
  steps = [r['step'] for r in run_files.read_jsonl(history_path)]
  assert steps == list(range(1, 301))


# ----------------------------------------------------------------------------
# One line for a workdir, a disk or checkpoints that fail.
# ----------------------------------------------------------------------------
def test_workdir_problems_are_one_line(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('x')
  cases = [
    (afile, f'--workdir={afile} is a file, not a folder'),
    (
      afile / 'sub' / 'run',
      f'--workdir={afile}/sub/run cannot be made: {afile} is a file, not a '
      'folder',
    ),
  ]
  for workdir, message in cases:
    with pytest.raises(run_files.WorkdirError) as e:
      run_files.prepare_workdir(workdir)
    assert str(e.value) == message
    assert cli.failure_line(e.value) == (message, 2)


@contextlib.contextmanager
def _read_only_folder(path):
  """A folder that cannot be written, even by root (a read-only tmpfs)."""
  os.makedirs(path)
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    yield
    os.chmod(path, 0o755)
    return
  mounted = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', str(path)],
    capture_output=True,
  )
  if mounted.returncode:
    pytest.skip(f'cannot mount a read-only tmpfs: {mounted.stderr}')
  try:
    yield
  finally:
    subprocess.run(['umount', str(path)], check=True)


def test_a_read_only_workdir_is_one_line(tmp_path):
  workdir = tmp_path / 'ro'
  with _read_only_folder(workdir):
    with pytest.raises(run_files.WorkdirError) as e:
      run_files.WorkdirLock(run_files.prepare_workdir(workdir)).acquire()
    assert re.fullmatch(
      f'--workdir={workdir} cannot be written: (Read-only file system|'
      'Permission denied)',
      str(e.value),
    ), str(e.value)
    with pytest.raises(run_files.WorkdirError, match='/sub cannot be written'):
      run_files.prepare_workdir(workdir / 'sub')


def test_failure_lines_of_a_full_disk_and_damaged_checkpoints():
  enospc = OSError(errno.ENOSPC, 'No space left on device', '/w/results.json')
  assert cli.failure_line(enospc) == (
    'the disk is full (No space left on device: /w/results.json). Free space '
    'and run the same command to resume from the last checkpoint',
    1,
  )
  # tensorstore's error, as orbax re-raises it from its writer thread.
  ts_error = ValueError(
    'RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/4/x": '
    'Failed to write 9002 bytes to file 8: No space left on device '
    "[os_error_code='28']\nmore"
  )
  try:
    try:
      raise ts_error
    except ValueError as inner:
      raise RuntimeError('background save failed') from inner
  except RuntimeError as outer:
    line, status = cli.failure_line(outer)
  assert status == 1 and '\n' not in line
  assert line.startswith('the disk is full (RESOURCE_EXHAUSTED: Error writing')
  damaged = checkpoints.NoUsableCheckpointError('None of the checkpoints ...')
  assert cli.failure_line(damaged) == ('None of the checkpoints ...', 1)
  assert cli.failure_line(ValueError('a bug')) is None
  assert cli.failure_line(OSError(errno.EIO, 'I/O error')) is None


FULL_DISK = """
import errno, runpy, sys
from vmoe_jsd import paths
def full(path, data):
  raise OSError(errno.ENOSPC, 'No space left on device', str(path))
paths.write_bytes = full
sys.argv = ['vmoe_jsd/main.py'] + sys.argv[1:]
runpy.run_module('vmoe_jsd.main', run_name='__main__')
"""


@pytest.mark.processes  # main ends at once (os._exit): its own process.
def test_main_says_a_full_disk_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  proc = commands.run(
    [
      sys.executable,
      '-c',
      FULL_DISK,
      f'--config={commands.SMOKE}',
      f'--workdir={workdir}',
    ]
  )
  assert proc.returncode == 1, proc.stderr
  _one_error_line(
    proc.stderr,
    'the disk is full (No space left on device: '
    f'{workdir}/config.json). Free space',
  )


@pytest.mark.processes  # main's exit status and stderr.
def test_main_says_a_workdir_that_is_a_file_in_one_line(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('x')
  proc = _main(workdir=afile)
  assert proc.returncode == 2, proc.stderr
  _one_error_line(proc.stderr, f'--workdir={afile} is a file, not a folder')


def _can_mount_tmpfs():
  probe = subprocess.run(
    ['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs -o size=1k tmpfs /mnt'],
    capture_output=True,
  )
  return probe.returncode == 0


@pytest.mark.slow  # Trains the smoke run until a 400 KiB tmpfs is full.
def test_a_really_full_disk_ends_in_one_line(tmp_path):
  """A tmpfs of 400 KiB (in a private mount namespace): an asynchronous
  checkpoint, the event file or the history fills it, depending on timing.
  Before, this printed 500-1,600 lines of tracebacks."""
  if not _can_mount_tmpfs():
    pytest.skip('no user namespaces to mount a tmpfs in')
  disk = tmp_path / 'disk'
  os.makedirs(disk)
  script = (
    f'mount -t tmpfs -o size=400k tmpfs {disk} && exec '
    f'{sys.executable} -m vmoe_jsd.main --config={commands.SMOKE} '
    f'--workdir={disk}/run'
  )
  proc = commands.run(['unshare', '-rm', 'sh', '-c', script])
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr + proc.stdout
  _one_error_line(proc.stderr, 'the disk is full (')


@pytest.mark.slow  # A subprocess gets as far as restoring (data, model).
def test_checkpoints_none_of_which_can_be_restored_end_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  for step in ('2', '4'):
    os.makedirs(workdir / 'checkpoints' / step)
    (workdir / 'checkpoints' / step / 'garbage').write_text('not orbax')
  proc = _main(workdir=workdir)
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr + proc.stdout
  # orbax warns once per step folder without metadata (as here, folders
  # that never were checkpoints; truncated real ones give no warning).
  *warnings, last = proc.stderr.strip().splitlines()
  assert all('Metadata file does not exist' in w for w in warnings), warnings
  _one_error_line(last, 'None of the checkpoints in ')
