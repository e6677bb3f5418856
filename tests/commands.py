"""The one way tests start a process, and the project's commands in process.

Every child gets the tests' compilation cache with no compile-time
threshold (a program another test compiled loads instead of compiling),
the CPU devices it asks for (one by default, as a user's run), the
repository and tests/ on its path, and the repository as its folder.
"""

import contextlib
import os
import signal
import subprocess
import sys

from absl import flags

from vmoe_jsd import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
SMOKE = os.path.join(TESTS, 'smoke_config.py')
HOOKS = os.path.join(TESTS, 'signal_hooks.py')


def env(num_devices=1, cache=True, **extra):
  """os.environ for a child process (conftest put the cache settings in
  it), `extra` variables added; no cache at all unless `cache`."""
  out = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
  out['XLA_FLAGS'] = (
    ''
    if num_devices == 1
    else f'--xla_force_host_platform_device_count={num_devices}'
  )
  if not cache:
    del out['JAX_COMPILATION_CACHE_DIR']
  return {**out, **extra}


def module(name, *args):
  """The command line of `python -m name args`."""
  return [sys.executable, '-m', name, *args]


def start(command, *, cwd=ROOT, merge=True, **env_args):
  """subprocess.Popen of `command` (text pipes; stderr into stdout when
  `merge`); env_args as env()'s."""
  return subprocess.Popen(
    command,
    cwd=cwd,
    env=env(**env_args),
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT if merge else subprocess.PIPE,
  )


def run(command, *, cwd=ROOT, timeout=600, **env_args):
  """subprocess.run of `command` to its end (stdout and stderr apart)."""
  return subprocess.run(
    command,
    cwd=cwd,
    env=env(**env_args),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@contextlib.contextmanager
def _as_a_command(argv):
  """sys.argv as the command's (config_flags reads its overrides there),
  absl's flags unparsed before and after, SIGINT's handler kept."""
  saved, handler = sys.argv, signal.getsignal(signal.SIGINT)
  sys.argv = argv
  flags.FLAGS.unparse_flags()
  try:
    yield
  finally:
    flags.FLAGS.unparse_flags()
    sys.argv = saved
    signal.signal(signal.SIGINT, handler)


def in_process(command, *args):
  """Runs `command.main` (a module whose flags are absl's global ones, as
  eval_main's) on `args` as `python -m` does; returns its exit status."""
  argv = [command.__file__, *args]
  with _as_a_command(argv):
    try:
      command.main(cli.parse_flags(argv))
    except SystemExit as e:
      return e.code
  return 0
