"""Every user error of every command: one line on stderr, exit status 2.

One table per way of running: in process where the command allows it
(eval_main's absl flags, the argparse commands), real processes only for
the commands whose flags are defined when they run as programs (main,
inspect_step, the benchmarks) and for damaged data met during training.
tests/test_cli.py checks main's config errors, tests/test_analyze.py
analyze's; they are not repeated here.
"""

import gzip
import os
import shutil
import sys

import commands
import pytest
from test_data import write_idx

from vmoe_jsd import cli, convert, eval_main, sweep
from vmoe_jsd.data import fashion_mnist, indexed

sys.path.insert(0, os.path.join(commands.ROOT, 'tools'))
import study  # noqa: E402 - tools/ is no package

SMOKE = commands.SMOKE


def _one_line(status, stderr, fragment):
  assert status == 2, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  assert 'Traceback' not in stderr
  assert fragment in lines[0], lines[0]
  return lines[0]


@pytest.fixture
def places(tmp_path):
  """{'FILE': a file, 'DIR': an empty folder} in tmp_path."""
  (tmp_path / 'a_file').write_text('x')
  (tmp_path / 'runs').mkdir()
  (tmp_path / 'runs' / 'default').mkdir()
  return {
    'FILE': str(tmp_path / 'a_file'),
    'DIR': str(tmp_path / 'runs' / 'default'),
    'TYPO': str(tmp_path / 'runs' / 'defualt'),
  }


def _fill(args, places):
  out = []
  for arg in args:
    for key, value in places.items():
      arg = arg.replace(key, value)
    out.append(arg)
  return out


# (args, fragment of the one line); FILE, DIR and TYPO as `places`. Each
# --config.KEY once: config_flags defines a flag per override in absl's
# global flags, which a second in-process parse cannot define again.
EVAL_MAIN = [
  (['--config=configs/defualt.py', '--checkpoint=DIR'],
   "config file 'configs/defualt.py' does not exist (did you mean "
   'configs/default.py?)'),
  ([f'--config={SMOKE}', '--checkpoint=TYPO'],
   "does not exist (did you mean "),
  ([f'--config={SMOKE}', '--checkpoint=FILE'],
   'is a file, not a folder; expected a workdir'),
  ([f'--config={SMOKE}', '--checkpoint=DIR'],
   'No orbax checkpoint found at '),
  ([f'--config={SMOKE}', '--checkpoint=DIR', '--num_stepz=3'],
   "Unknown command line flag 'num_stepz'"),
  ([f'--config={SMOKE}', '--checkpoint=DIR', '--config.seed=abc'],
   "--config.seed=abc: invalid literal for int() with base 10: 'abc'"),
  ([f'--config={SMOKE}', '--checkpoint=DIR', '--config.num_train_steps=-3'],
   'config.num_train_steps=-3 is invalid: must be an integer'),
  ([f'--config={SMOKE}', '--checkpoint=DIR', '--suite=robustnes'],
   "--suite='robustnes': 'robustnes' is unknown; choose from"),
  ([f'--config={SMOKE}'], 'error: --checkpoint is required (see --help)'),
  ([], '--config and --checkpoint are required'),
]  # fmt: skip


@pytest.mark.parametrize('args,fragment', EVAL_MAIN)
def test_eval_main_errors_are_one_line(args, fragment, places, capsys):
  status = commands.in_process(eval_main, *_fill(args, places))
  line = _one_line(status, capsys.readouterr().err, fragment)
  assert line.startswith('vmoe_jsd.eval_main: error: ')


def test_a_typo_in_checkpoint_names_the_folder_meant(places, capsys):
  status = commands.in_process(
    eval_main, f'--config={SMOKE}', f'--checkpoint={places["TYPO"]}'
  )
  line = _one_line(status, capsys.readouterr().err, 'does not exist')
  assert f'did you mean {places["DIR"]}?' in line


def _sweep(*args):
  return sweep.main(list(args))


def _convert(*args):
  return convert.main(list(args))


def _study(*args):
  return study.main(list(args))


# (command, args, fragment).
ARGPARSE = [
  (_sweep, ['--config=configs/default.py'], '--workdir is required'),
  (_sweep, ['--workdir=DIR', '--parallel=abc'], "invalid int value: 'abc'"),
  (_sweep, ['--workdir=DIR', '--num_stepz=3'], "unknown argument '--num"),
  (_convert, [], 'the following arguments are required: --input, --output'),
  (_convert, ['--input=TYPO', '--output=DIR/out'], 'Input not found'),
  (_convert, ['--input=DIR', '--output=x', '--num_shards=abc'],
   "argument --num_shards: invalid int value: 'abc'"),
  (_convert, ['--input=DIR', '--output=x', '--num_stepz=3'],
   'unrecognized arguments: --num_stepz=3'),
  (_study, ['--jobs=-2'], '--jobs=-2 is invalid: must be an integer >= 1'),
  (_study, ['--search_steps=abc'], "invalid int value: 'abc'"),
  (_study, ['--losses=jsdd'], "'jsdd' is not a consistency loss"),
  (_study, ['--seeds=0,x'], "--seeds='0,x' is invalid: expected seeds"),
  (_study, ['--phase=fianl'], "invalid choice: 'fianl'"),
  (_study, ['--robustness'], '--robustness needs --settings'),
  (_study, ['--settings=none,kl@0.1'], "'kl' is not a consistency loss"),
]  # fmt: skip


@pytest.mark.parametrize(
  'command,args,fragment', ARGPARSE, ids=lambda x: getattr(x, '__name__', None)
)
def test_argparse_command_errors_are_one_line(
  command, args, fragment, places, capsys
):
  try:
    status = command(*_fill(args, places))
  except SystemExit as e:
    status = e.code
  _one_line(status, capsys.readouterr().err, fragment)


def test_program_names_follow_the_command(monkeypatch):
  for argv0, name in [
    ('/r/vmoe_jsd/eval_main.py', 'vmoe_jsd.eval_main'),
    ('/r/benchmarks/memory.py', 'benchmarks/memory.py'),
    ('tools/study.py', 'tools/study.py'),
    ('/usr/bin/pytest', 'vmoe_jsd'),
  ]:
    monkeypatch.setattr(sys, 'argv', [argv0])
    assert cli.program_name() == name


def test_damaged_data_is_one_line_of_status_2_even_when_wrapped():
  error = indexed.DataError('/d/train-images-idx3-ubyte.gz is truncated')
  try:
    try:
      raise error
    except indexed.DataError as e:
      raise RuntimeError('input pipeline thread failed') from e
  except RuntimeError as wrapped:
    assert cli.failure_line(wrapped) == (str(error), 2)


def _fmnist(folder, damage):
  """The four Fashion-MNIST files in `folder` (30 train, 12 test images),
  then `damage` applied to them; returns the damaged file's path."""
  import numpy as np  # noqa: PLC0415

  rng = np.random.default_rng(0)
  for split, n in (('train', 30), ('test', 12)):
    images_file, labels_file = fashion_mnist.FILES[split]
    write_idx(
      str(folder / images_file), rng.integers(0, 256, (n, 28, 28), np.uint8)
    )
    write_idx(str(folder / labels_file), rng.integers(0, 10, n, np.uint8))
  return damage(folder)


def _truncate(folder):
  path = folder / fashion_mnist.FILES['train'][0]
  path.write_bytes(path.read_bytes()[:-200])
  return str(path)


def _test_labels_over_train(folder):
  labels = [fashion_mnist.FILES[s][1] for s in ('test', 'train')]
  shutil.copy(folder / labels[0], folder / labels[1])
  return str(folder / labels[1])


DAMAGE = [
  (_truncate, 'is truncated (the gzip stream ends early)'),
  (_test_labels_over_train, 'holds 30 images but '),
]


@pytest.mark.parametrize(
  'damage,fragment', DAMAGE, ids=['truncated', 'test_labels_over_train']
)
@pytest.mark.processes  # main trains: the error comes from its data loading.
def test_main_names_a_damaged_data_file_in_one_line(tmp_path, damage, fragment):
  path = _fmnist(tmp_path, damage)
  proc = commands.run(
    commands.module(
      'vmoe_jsd.main',
      '--config=configs/default.py:runlocal',
      f'--config.dataset.train.data_dir={tmp_path}',
      f'--config.dataset.test.data_dir={tmp_path}',
      f'--workdir={tmp_path / "run"}',
    )
  )
  line = _one_line(proc.returncode, proc.stderr, fragment)
  assert path in line and line.startswith('vmoe_jsd.main: error: ')


# Real processes: (command line, fragment).
PROCESSES = [
  (commands.module('vmoe_jsd.main', f'--config={SMOKE}', '--workdir=FILE'),
   'FILE'),
  (commands.module('vmoe_jsd.main', f'--config={SMOKE}', '--workdir=DIR',
                   '--num_stepz=3'),
   "Unknown command line flag 'num_stepz'"),
  (commands.module('vmoe_jsd.inspect_step', f'--config={SMOKE}',
                   '--num_devices=-3'),
   '--num_devices=-3 is invalid: must be an integer >= 1'),
  ([sys.executable, 'benchmarks/train_step.py', '--steps=-1'],
   '--steps=-1'),
  ([sys.executable, 'benchmarks/slice_tiling.py', '--rounds=x'],
   "argument --rounds: invalid int value: 'x'"),
]  # fmt: skip


@pytest.mark.parametrize(
  'command,fragment',
  PROCESSES,
  ids=['main_workdir_is_a_file', 'main_unknown_flag', 'inspect_step_negative',
       'benchmark_absl_negative', 'benchmark_argparse_bad_int'],
)  # fmt: skip
@pytest.mark.processes  # flags defined only when the module is the program.
def test_command_errors_are_one_line_in_a_process(command, fragment, places):
  proc = commands.run(_fill(command, places))
  _one_line(proc.returncode, proc.stderr, _fill([fragment], places)[0])


def test_fmnist_fixture_loads_undamaged(tmp_path):
  _fmnist(tmp_path, lambda folder: None)
  assert len(fashion_mnist.load('train', str(tmp_path))) == 30
  with gzip.open(tmp_path / fashion_mnist.FILES['test'][1]) as f:
    assert len(f.read()) == 8 + 12


def test_checkpoint_check_accepts_vmoe_prefixes_and_names_typos(tmp_path):
  (tmp_path / 'ckpt.index').write_bytes(b'')
  for ok in ('ckpt', 'ckpt.index'):
    eval_main._check_checkpoint(str(tmp_path / ok))  # No error.
  with pytest.raises(cli.CliError) as e:
    eval_main._check_checkpoint(str(tmp_path / 'ckpy'))
  assert f'does not exist (did you mean {tmp_path / "ckpt"}?)' in str(e.value)
