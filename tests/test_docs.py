"""The docs cannot go stale: their commands parse, their tables and example
error lines match the code.

Every command line in README.md, docs/*.md and benchmarks/README.md (fenced
and indented code blocks, and inline code that starts with
`.venv/bin/python`) is checked at its cheapest form, in process: the module
or script runs as `python -m X` / `python X.py` would, up to its argument
parsing (absl's flags or argparse, the real parser; an unknown flag or a bad
value fails), and every `--config=FILE[:ARG]` is loaded with its
`--config.x=y` overrides and validated (data that is not on this machine
swapped for synthetic arrays, as tests/test_configs.py does). Substitutions
made in the commands: optional `[--flag=value]` groups are kept without the
brackets (a group with `...` is dropped); the placeholders FILE, DIR, W
and <...> become configs/default.py and a temporary folder, N (devices), P
(expert partitions) and M (microsteps) become 8, 4 and 2; a device count in
XLA_FLAGS is the one the config is validated for. A script outside the
repository (`../shared/bench/...`, another project's harness) is not
checked, nor are the generated docs (GENERATED: tools/study.py writes them).
"""

import argparse
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import signal
import sys
import warnings

import commands
import pytest
from absl import app, flags
from absl import logging as absl_logging

from vmoe_jsd import cli, run_files, sweep

ROOT = commands.ROOT
DOCS = sorted(
  [
    os.path.join(ROOT, 'README.md'),
    os.path.join(ROOT, 'benchmarks', 'README.md'),
    *glob.glob(os.path.join(ROOT, 'docs', '*.md')),
  ]
)
PYTHON = '.venv/bin/python'
# Generated docs quote the command that made them; tools/study.py writes them.
GENERATED = ('docs/results.md', 'docs/search.md', 'docs/robustness_results.md')


# --- Finding the commands. --------------------------------------------------
def _code_lines(text):
  """(line number, text) of each line of a fenced (not ```python) or an
  indented code block, continuation lines (`\\`) joined."""
  out, fence, previous_blank, pending = [], None, True, None
  for number, line in enumerate(text.splitlines(), 1):
    stripped = line.strip()
    if stripped.startswith('```'):
      fence = None if fence is not None else stripped[3:].strip()
      continue
    in_code = (fence is not None and fence not in ('python', 'json')) or (
      fence is None and line.startswith('    ') and previous_blank
    )
    previous_blank = not stripped or (previous_blank and in_code)
    if not in_code and pending is None:
      continue
    if pending is not None:
      pending = (pending[0], pending[1] + ' ' + stripped)
    else:
      pending = (number, stripped)
    if not pending[1].endswith('\\'):
      out.append(pending)
      pending = None
    else:
      pending = (pending[0], pending[1][:-1].rstrip())
  return out


def _inline(text):
  """(line number, text) of inline code that starts with .venv/bin/python
  (or a bare python, python3 or pytest, to be reported)."""
  out, start = [], r'(?:\.venv/bin/python|python3?|pytest)\s'
  for match in re.finditer(rf'(?<!`)`({start}[^`]*)`', text):
    number = text.count('\n', 0, match.start()) + 1
    out.append((number, ' '.join(match.group(1).replace('\\', ' ').split())))
  return out


def _commands(path):
  """(line, command) of each command in the markdown file `path`."""
  with open(path) as f:
    text = f.read()
  found = []
  for number, line in _code_lines(text) + _inline(text):
    line = re.sub(r'\s+#.*$', '', line)  # a comment
    line = re.sub(r'\s{2,}\(.*\)$', '', line)  # a diagram's `  (file.py)`
    for part in line.split('&&'):
      part = part.strip()
      if re.match(
        r'(\S+=\S+\s+)*(\./setup\.sh|\S*python\S*|\S*ruff|pytest)\b', part
      ):
        found.append((number, part))
  return found


DOC_COMMANDS = [
  (os.path.relpath(path, ROOT), number, command)
  for path in DOCS
  for number, command in _commands(path)
]


# --- Running a command up to its argument parsing. -------------------------
class _Parsed(Exception):
  """Raised in place of the command's main once its arguments parsed."""


@contextlib.contextmanager
def _private_absl_flags(argv0):
  """absl's global flags as a fresh process has them (absl's own only),
  restored afterwards with their values unparsed; flags that a module
  imported meanwhile defined stay, not the command's own (absl names the
  module of `__main__`'s flags by sys.argv[0], `argv0`; config_flags'
  `--config.x` override flags, absl's)."""
  state = flags.FLAGS.__dict__
  saved = dict(state)
  names = ('__flags_by_module', '__key_flags_by_module')
  saved.update({k: {m: list(v) for m, v in state[k].items()} for k in names})
  saved['__flags_by_module_id'] = dict(state['__flags_by_module_id'])
  absl_flags = {
    f.name for m, fl in state['__flags_by_module'].items() for f in fl
    if m.startswith('absl')
  }  # fmt: skip
  state['__flags'] = {
    n: f for n, f in state['__flags'].items() if f.name in absl_flags
  }
  for k in names:
    state[k] = {m: list(v) for m, v in state[k].items() if m.startswith('absl')}
  state['__flags_by_module_id'] = {}
  verbosity = absl_logging.get_verbosity()
  try:
    yield
  finally:
    for module, defined in state['__flags_by_module'].items():
      mine = module in ('__main__', argv0) or module.startswith('absl')
      if not mine and module not in saved['__flags_by_module']:
        saved['__flags_by_module'][module] = defined
        saved['__flags'].update({f.name: f for f in defined})
    state.update(saved)
    flags.FLAGS.unparse_flags()
    absl_logging.set_verbosity(verbosity)


def _fake_app_run(main, argv=None, flags_parser=None):
  del main  # Not run: only the flags are checked.
  (flags_parser or app.parse_flags_with_usage)(argv or sys.argv)
  raise _Parsed()


def _argparse_then_stop(parse_args, parse_known_args):
  """argparse's two parse methods, each raising _Parsed once it parsed (and
  parse_args once it checked that no argument is left over)."""
  inside = []

  def known(self, args=None, namespace=None):
    result = parse_known_args(self, args, namespace)
    if not inside:
      raise _Parsed()
    return result

  def full(self, args=None, namespace=None):
    inside.append(True)
    try:
      parse_args(self, args, namespace)
    finally:
      inside.pop()
    raise _Parsed()

  return full, known


def parse_as_command(target, args, *, as_module):
  """None if `target args` parses (absl or argparse, the command's own
  parser), else its error. `target` is a module name or a script path."""
  if target == 'vmoe_jsd.sweep':  # main() would run the sweep; parse only.
    try:
      sweep.parse_args(args)
    except cli.CliError as e:
      return str(e)
    return None
  argv = [target, *args]
  stderr = io.StringIO()
  saved_argv, saved_path = sys.argv, list(sys.path)
  parser = argparse.ArgumentParser
  parse, parse_known = parser.parse_args, parser.parse_known_args
  try:
    with (
      _private_absl_flags(target),
      contextlib.redirect_stderr(stderr),
      contextlib.redirect_stdout(io.StringIO()),
      warnings.catch_warnings(),
    ):
      # runpy's note that vmoe_jsd.main was imported before (by the tests).
      warnings.filterwarnings('ignore', "'.*' found in sys.modules")
      sys.argv = argv
      app.run = _fake_app_run
      parser.parse_args, parser.parse_known_args = _argparse_then_stop(
        parse, parse_known
      )
      if as_module:
        runpy.run_module(target, run_name='__main__', alter_sys=False)
      else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name='__main__')
    return f'ran past its argument parsing: {stderr.getvalue()}'
  except _Parsed:
    return None
  except SystemExit as e:
    return None if not e.code else f'exit {e.code}: {stderr.getvalue()}'
  except Exception as e:  # noqa: BLE001 - a missing module, a crash
    return f'{type(e).__name__}: {e}'
  finally:
    parser.parse_args, parser.parse_known_args = parse, parse_known
    app.run = _APP_RUN
    sys.argv, sys.path[:] = saved_argv, saved_path


_APP_RUN = app.run


# --- Configs named on a command line. ---------------------------------------
def check_config(args, tmp_path, num_devices=None):
  """None if the --config (with its overrides) of `args` loads and
  validates, else the one-line error the commands print."""
  if cli.config_arg(args) is None:
    return None
  try:
    config = cli.load_config(['prog', *args])
    with config.unlocked():
      if config.initialization.get('source'):
        config.initialization.path = str(tmp_path)  # exists
      for split in config.dataset:  # file checks need the data; not here
        if config.dataset[split].name in ('fashion_mnist', 'tfds'):
          config.dataset[split].name = 'synthetic'
          config.dataset[split].num_classes = config.model.num_classes
    devices = num_devices or next(
      (int(a.split('=')[1]) for a in args if a.startswith('--num_devices=')),
      config.num_expert_partitions,
    )
    cli.check_config(config, devices)
  except cli.CliError as e:
    return str(e)
  return None


def substitute(command, tmp_path):
  """The command with its placeholders filled in (see the module doc)."""
  command = re.sub(r'\[[^\]]*\.\.\.[^\]]*\]', '', command)
  command = re.sub(r'\[([^\]]*)\]', r'\1', command)
  folder = str(tmp_path / 'folder')
  command = re.sub(r'<[^>]*>', folder, command)
  values = {'FILE': 'configs/default.py', 'DIR': folder, 'W': folder}
  values.update(N='8', P='4', M='2')  # devices, expert partitions, microsteps
  return re.sub(
    r'=(FILE|DIR|W|N|P|M)(?=\s|$)', lambda m: '=' + values[m.group(1)], command
  )


def problems(command, tmp_path):
  """What is wrong with one documented command (None if nothing)."""
  words = shlex.split(substitute(command, tmp_path))
  devices = None  # a simulated device count in XLA_FLAGS, else the flags'
  while words and re.match(r'\w+=', words[0]):  # VAR=value prefixes
    count = re.search(r'device_count=(\d+)', words.pop(0))
    devices = int(count.group(1)) if count else devices
  program, args = words[0], words[1:]
  if program == './setup.sh':
    with open(os.path.join(ROOT, 'setup.sh')) as f:
      known = f.read()
    bad = [a for a in args if f'{a.split("=")[0]}' not in known]
    return f'setup.sh has no option {bad}' if bad else None
  if program == '.venv/bin/ruff':
    return None if args and args[0] in ('check', 'format') else 'ruff verb'
  if program != PYTHON:
    return f'not spelt {PYTHON} (run from the repository root)'
  if args[:2] == ['-m', 'pytest']:
    paths = [a.split('::')[0] for a in args[2:] if a.startswith('tests/')]
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    return f'no test file {missing}' if missing else None
  as_module = args[0] == '-m'
  target, args = (args[1], args[2:]) if as_module else (args[0], args[1:])
  if target.startswith('../'):
    return None  # the benchmark harness outside the repository, not ours
  if not as_module and not os.path.isfile(os.path.join(ROOT, target)):
    return f'no script {target}'
  return parse_as_command(target, args, as_module=as_module) or check_config(
    args, tmp_path, devices
  )


def test_the_docs_name_commands():
  """The extraction finds the commands (a broken parser would pass all)."""
  files = {path for path, _, _ in DOC_COMMANDS}
  assert {'README.md', 'benchmarks/README.md', 'docs/running.md'} <= files
  assert len(DOC_COMMANDS) > 20


def test_every_documented_command_parses(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  failures = []
  for path, number, command in DOC_COMMANDS:
    if path in GENERATED:
      continue
    problem = problems(command, tmp_path)
    if problem:
      failures.append(
        f'{path}:{number}: {command}\n    {cli.one_line(problem)}'
      )
  assert not failures, '\n'.join(failures)


MAIN = f'{PYTHON} -m vmoe_jsd.main --config=configs/default.py'


@pytest.mark.parametrize(
  'command, error',
  [
    ('python -m vmoe_jsd.main --config=configs/default.py', 'not spelt'),
    (
      f'{PYTHON} -m vmoe_jsd.main --config=configs/default.py --wrkdir=x',
      'wrkdir',
    ),
    (f'{PYTHON} -m vmoe_jsd.mian --config=configs/default.py', 'mian'),
    (f'{PYTHON} benchmarks/train_stp.py', 'no script'),
    (
      f'{PYTHON} benchmarks/memory.py --config=configs/default.py --nostp',
      'nostp',
    ),
    (f'{PYTHON} tools/study.py --finalsts=4', 'finalsts'),
    (f'{PYTHON} -m vmoe_jsd.convert --input=a --output=b --shards=2', 'shards'),
    (
      f'{PYTHON} -m vmoe_jsd.sweep --workdir=a --paralel=2',
      'paralel',
    ),
    (
      f'{PYTHON} -m vmoe_jsd.main --config=configs/defualt.py --workdir=a',
      'defualt',
    ),
    (
      f'{MAIN} --workdir=a --config.seeed=1',
      'seeed',
    ),
    (
      f'{MAIN} --workdir=a --config.optimizer.learning_rate.peak_value=-1',
      'peak_value',
    ),
    (f'{PYTHON} -m pytest tests/test_nothing.py', 'test_nothing'),
    ('./setup.sh --accelerater=gpu', 'accelerater'),
  ],
)
def test_a_stale_command_is_reported(command, error, tmp_path, monkeypatch):
  """What the docs check catches: a renamed module, script, flag, config
  file or key, a bad value, a bare python."""
  monkeypatch.chdir(ROOT)
  problem = problems(command, tmp_path)
  assert problem and error in problem, problem


def test_a_documented_command_passes(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  command = (
    f'{PYTHON} -m vmoe_jsd.main --config=FILE --workdir=DIR [--config.seed=3]'
  )
  assert problems(command, tmp_path) is None


# --- The configs table. -----------------------------------------------------
def test_the_configs_table_names_every_config_and_no_other():
  with open(os.path.join(ROOT, 'docs', 'configuration.md')) as f:
    text = f.read()
  table = text.split('## Configs in this repository', 1)[1].split('\n\n')[1]
  rows = [r for r in table.splitlines() if r.startswith('| `')]
  named = {
    os.path.basename(name)
    for row in rows
    for name in re.findall(r'`([\w/]+\.py)`', row.split(' | ')[0])
  }
  files = {
    os.path.basename(p)
    for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
  }
  assert named - files == set(), 'the table names configs that do not exist'
  assert files - named == set(), 'configs missing from docs/configuration.md'


# --- Example error lines. ---------------------------------------------------
ERROR = re.compile(r'^vmoe_jsd\.\w+: error: ')


def _example_errors(path):
  """(line, text) of each example error line in a code block of `path`
  (an indented block's wrapped lines joined)."""
  with open(path) as f:
    lines = f.read().splitlines()
  out, fence = [], False
  for number, line in enumerate(lines, 1):
    fence = fence != line.strip().startswith('```')
    text = line.strip()
    if not ERROR.match(text) or not (fence or line.startswith('    ')):
      continue
    for more in lines[number:]:  # an indented block wraps a long line
      if fence or not more.startswith('    ') or ERROR.match(more.strip()):
        break
      text += ' ' + more.strip()
    out.append((number, text))
  return out


def _run_main_app(main, argv=None, flags_parser=None):
  """absl's app.run as commands.in_process runs a main: the command's own
  flags parser, then main (no absl logging handler, no exception hooks)."""
  sys.exit(main(flags_parser(argv or sys.argv)))


def _main_error(*args):
  """What `python -m vmoe_jsd.main --workdir=runs/a args` prints on stderr
  (it must end with exit status 2), run in process with private flags (the
  tests import eval_main, whose --config would clash with main's)."""
  err, saved = io.StringIO(), (sys.argv, sys.unraisablehook)
  handler = signal.getsignal(signal.SIGINT)
  try:
    with (
      _private_absl_flags('vmoe_jsd/main.py'),
      contextlib.redirect_stderr(err),
      contextlib.redirect_stdout(io.StringIO()),
      warnings.catch_warnings(),
      pytest.raises(SystemExit) as exit_,
    ):
      warnings.filterwarnings('ignore', "'.*' found in sys.modules")
      sys.argv = ['vmoe_jsd/main.py', '--workdir=runs/a', *args]
      app.run = _run_main_app
      runpy.run_module('vmoe_jsd.main', run_name='__main__', alter_sys=False)
  finally:
    app.run = _APP_RUN
    sys.argv, sys.unraisablehook = saved
    signal.signal(signal.SIGINT, handler)
  assert exit_.value.code == 2, err.getvalue()
  return err.getvalue().strip()


def _workdir_in_use(tmp_path):
  """What main prints when another run holds runs/a's lock: the lock's own
  error through main's failure path (cli.failure_line, cli.fail); the
  holder's pid, host, time and command masked as they vary."""
  workdir = tmp_path / 'runs' / 'a'
  workdir.mkdir(parents=True)
  err, saved = io.StringIO(), sys.argv
  with run_files.WorkdirLock(str(workdir)):
    try:
      run_files.WorkdirLock(str(workdir)).acquire()
    except run_files.WorkdirError as e:
      line, status = cli.failure_line(e)
  sys.argv = ['vmoe_jsd/main.py']
  try:
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
      cli.fail(line, status)
  finally:
    sys.argv = saved
  return err.getvalue().strip().replace(str(workdir), 'runs/a')


_HOLDER = r'\(pid \d+ on \S+, started \S+, command: [^)]*\)'
# The key each documented example contains, and how to produce its text.
EXAMPLES = {
  'peak_value=-0.001': lambda _: _main_error(
    '--config=configs/default.py',
    '--config.optimizer.learning_rate.peak_value=-0.001',
  ),
  "'consistency.wieght'": lambda _: _main_error(
    '--config=configs/default.py', '--config.consistency.wieght=0.1'
  ),
  "'configs/defualt.py'": lambda _: _main_error('--config=configs/defualt.py'),
  'is in use by another run': _workdir_in_use,
}


def _mask(text):
  return re.sub(_HOLDER, '(pid P on H, started T, command: C)', text)


def test_example_error_lines_are_what_the_commands_print(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  found = [
    (os.path.relpath(path, ROOT), number, text)
    for path in DOCS
    for number, text in _example_errors(path)
  ]
  keys = [next((k for k in EXAMPLES if k in t), None) for _, _, t in found]
  assert set(keys) == set(EXAMPLES), (
    f'an example with no producer in EXAMPLES, or one gone: {found}'
  )
  wrong = []
  for (path, number, text), key in zip(found, keys, strict=True):
    printed = EXAMPLES[key](tmp_path)
    if _mask(printed) != _mask(text):
      wrong.append(f'{path}:{number}:\n  docs:    {text}\n  printed: {printed}')
  assert not wrong, '\n'.join(wrong)
