"""Command-line plumbing shared by the commands (main, eval_main, sweep...).

A bad command line or config (a missing config file, a misspelt key, a
value of the wrong type), and a run that fails for a reason the user can
act on (the workdir is in use, not a folder, read-only or trained with
another config; a full disk; no checkpoint can be restored), end with ONE
line on stderr instead of a traceback: exit status 2 for the command line,
the config, the workdir and a damaged input data file (data.indexed.
DataError, naming the file), 1 for the others. `ArgumentParser` gives the
argparse commands (convert, tools/study.py, benchmarks) the same one
line. TensorFlow's start-up banners and the INFO records of libraries stay
off the console.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import glob
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence

import jax
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vmoe_jsd import checkpoints, config_lib, run_files
from vmoe_jsd.config_errors import flatten
from vmoe_jsd.data import indexed, mini

REPO_CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs'
)


class CliError(Exception):
  """A problem with the command line or the config, as one line of text."""


def program_name() -> str:
  """'vmoe_jsd.main' for `python -m vmoe_jsd.main`, 'benchmarks/memory.py'
  for a script outside the package, else 'vmoe_jsd'."""
  path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ''
  name, folder = os.path.basename(path), os.path.basename(os.path.dirname(path))
  if not name.endswith('.py'):
    return 'vmoe_jsd'
  if folder == 'vmoe_jsd':
    return f'vmoe_jsd.{name[:-3]}'
  return f'{folder}/{name}' if folder in ('benchmarks', 'tools') else 'vmoe_jsd'


def print_error(message: str) -> None:
  """Prints `prog: error: message` (one line) to stderr."""
  print(
    f'{program_name()}: error: {one_line(message)}', file=sys.stderr, flush=True
  )


def fail(message: str, status: int = 2):
  """Prints `prog: error: message` (one line) to stderr and exits."""
  print_error(message)
  sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose errors are `fail`'s one line (status 2) with
  the usage in it, instead of argparse's usage block."""

  def error(self, message: str):
    usage = self.format_usage().strip().removeprefix('usage: ')
    fail(f'{message}. Usage: {usage}')


def missing_path_message(flag: str, path: str, what: str) -> str:
  """`--flag='path' does not exist` with the closest existing sibling (a
  typo) and `what` would be valid."""
  folder = os.path.dirname(path.rstrip('/')) or '.'
  try:  # Names and their stems (a vmoe prefix's PREFIX.index: PREFIX).
    names = sorted(
      {
        m
        for n in os.listdir(folder)
        if not n.startswith('.')
        for m in (os.path.splitext(n)[0], n)
      }
    )
  except OSError:
    names = []
  base = os.path.basename(path.rstrip('/'))
  close = difflib.get_close_matches(base, names, n=1)
  near = (
    os.path.join(os.path.dirname(path.rstrip('/')), close[0]) if close else ''
  )
  hint = f' (did you mean {near}?)' if close else ''
  return f'--{flag}={path!r} does not exist{hint}; expected {what}'


def one_line(message: str) -> str:
  """Collapses a (possibly multi-line) message into one line."""
  return ' '.join(str(message).split())


# --- Config files and flags. ------------------------------------------------
def config_arg(argv: Sequence[str], name: str = 'config') -> str | None:
  """The value of --config (either `--config=X` or `--config X`)."""
  for i, arg in enumerate(argv):
    for prefix in (f'--{name}=', f'-{name}='):
      if arg.startswith(prefix):
        return arg[len(prefix) :]
    if arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def missing_config_message(value: str) -> str | None:
  """None if the file of `--config=FILE[:ARG]` exists, else a message that
  lists the configs next to it (or in the repository's configs/)."""
  path = value.split(':', 1)[0]
  if os.path.isfile(path):
    return None
  folder = os.path.dirname(path) or '.'
  if not os.path.isdir(folder) or not glob.glob(os.path.join(folder, '*.py')):
    folder = 'configs' if os.path.isdir('configs') else REPO_CONFIGS
  found = sorted(
    os.path.join(os.path.relpath(folder), os.path.basename(p))
    if not os.path.isabs(path)
    else p
    for p in glob.glob(os.path.join(folder, '*.py'))
    if not os.path.basename(p).startswith('_')
  )
  close = difflib.get_close_matches(path, found, n=1)
  hint = f' (did you mean {close[0]}?)' if close else ''
  return (
    f'config file {path!r} does not exist{hint}. Configs that exist: '
    f'{", ".join(found) or "(none)"}'
  )


def _config_argv(argv: Sequence[str], name: str) -> list[str]:
  """The program name and the --<name> / --<name>.key arguments of argv."""
  out = list(argv[:1])
  rest = list(argv[1:])
  for i, arg in enumerate(rest):
    if arg.lstrip('-').split('=')[0] == name and '=' not in arg:
      out += rest[i : i + 2]
    elif arg.lstrip('-').startswith((f'{name}=', f'{name}.')):
      out.append(arg)
  return out


def _parse(argv: Sequence[str], name: str):
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
    name,
    None,
    'config file',
    flag_values=fv,
    lock_config=True,
    sys_argv=list(argv),
  )
  fv(list(argv), known_only=False)
  return holder.value


def _unknown_key_line(argv: Sequence[str], name: str) -> str | None:
  """'config has no key ...' for the first override naming no config key."""
  prefix = f'--{name}.'
  argv = _config_argv(argv, name)
  overrides = [
    a[len(prefix) :].split('=')[0] for a in argv if a.startswith(prefix)
  ]
  try:
    plain = [a for a in argv if not a.startswith(prefix)]
    keys = flatten(_parse(plain, name))
  except Exception:  # noqa: BLE001 - the config itself fails: not our case.
    return None
  for key in overrides:
    if key not in keys and not any(k.startswith(key + '.') for k in keys):
      close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
      hint = f'; did you mean {" or ".join(close)}?' if close else ''
      return f'config has no key {key!r} ({prefix}{key}){hint}'
  return None


def _flag_error_line(error: Exception, argv: Sequence[str], name: str) -> str:
  """One line for an absl/config_flags parsing error."""
  unknown = _unknown_key_line(argv, name)
  if unknown:
    return unknown
  text = str(error)
  required = re.findall(
    r'Flag --([\w.]+) must have a value other than None', text
  )
  if required:
    required = list(dict.fromkeys(required))
    names = ' and '.join(f'--{n}' for n in required)
    return (
      f'{names} {"is" if len(required) == 1 else "are"} required (see --help)'
    )
  if 'Traceback (most recent call last)' in text:
    # config_flags embeds the traceback of get_config(); keep its last line.
    lines = [x for x in text.splitlines() if x.strip()]
    text = f'{lines[0].split(":")[0]}: {lines[-1].strip()}'
  if not isinstance(error, flags.Error):
    text = f'{type(error).__name__}: {text}'
  return one_line(text)


def load_config(argv: Sequence[str], name: str = 'config'):
  """The locked ConfigDict of flag --`name` in `argv` (program name first,
  e.g. ['prog', '--config=configs/default.py:runlocal', '--config.seed=1']),
  overrides applied, parsed with a private FlagValues.

  Raises:
    CliError: one line naming the missing file, bad key or bad value.
  """
  argv = list(argv)
  value = config_arg(argv, name)
  if value is None:
    raise CliError(f'--{name}=FILE is required')
  missing = missing_config_message(value)
  if missing:
    raise CliError(missing)
  argv = _config_argv(argv, name)
  try:
    return _parse(argv, name)
  except Exception as e:  # noqa: BLE001 - get_config() may raise anything.
    raise CliError(_flag_error_line(e, argv, name)) from None


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=parse_flags)`: one-line errors, exit 2."""
  value = config_arg(argv)
  if value is not None:
    missing = missing_config_message(value)
    if missing:
      fail(missing)
  try:
    rest = flags.FLAGS(argv)
    if value is not None and 'config' in flags.FLAGS:
      _ = flags.FLAGS['config'].value  # Loads the file now (lazy otherwise).
  except Exception as e:  # noqa: BLE001 - get_config() may raise anything.
    fail(_flag_error_line(e, argv, 'config'))
  if 'verbosity' in flags.FLAGS and not flags.FLAGS['verbosity'].present:
    # Libraries log at INFO through absl; the project prints its own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
  return rest


def check_config(config, num_devices: int) -> config_lib.RunSpec:
  """config_lib.validate (its RunSpec), its error (if any) raised as a
  one-line CliError."""
  try:
    return config_lib.validate(config, num_devices)
  except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
    raise CliError(one_line(str(e).strip('"\''))) from None


# --- Console. ---------------------------------------------------------------
def quiet_console() -> None:
  """Imports TensorFlow with its start-up banners silenced (if installed).

  TF 2.21 logs 'oneDNN custom operations are on' (twice) through absl's C++
  logging before it is initialised, which TF_CPP_MIN_LOG_LEVEL does not
  reach; importing it once with stderr pointed at /dev/null keeps the
  numerics (oneDNN stays on) and drops only the banners. An import error is
  raised again, with its message, outside the redirection.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if 'tensorflow' in sys.modules:
    return
  null = os.open(os.devnull, os.O_WRONLY)
  try:
    with mini.redirected(null, fds=(2,)):
      import tensorflow  # noqa: F401, PLC0415 - optional; banners muted
  except ImportError:
    pass  # TF is optional for the pure-JAX paths.
  finally:
    os.close(null)


def visible_gpus() -> list[str]:
  """NVIDIA GPU device files on this machine (empty when none)."""
  return sorted(glob.glob('/dev/nvidia[0-9]*'))


def describe_devices() -> list[str]:
  """Lines naming JAX's backend and devices (and a warning if a GPU idles)."""
  backend, gpus = jax.default_backend(), visible_gpus()
  kinds = sorted({d.device_kind for d in jax.devices()})
  lines = [
    f'JAX {jax.__version__} backend: {backend}; {jax.device_count()} '
    f'device(s) ({", ".join(kinds)}) on {jax.process_count()} process(es).'
  ]
  if backend == 'cpu' and gpus:
    lines.append(
      f'WARNING: this machine has GPU device files ({len(gpus)}: '
      f'{", ".join(gpus[:4])}) but JAX runs on the CPU. Install the '
      'CUDA build with ./setup.sh --accelerator=gpu.'
    )
  return lines


# --- Failures during a run. -------------------------------------------------
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How tensorstore (orbax's array writer) and absl's C++ status say ENOSPC.
DISK_FULL_TEXT = (
  'No space left on device',
  "os_error_code='28'",
  'Disk quota exceeded',
)


def _chain(error: BaseException) -> Iterator[BaseException]:
  """`error`, its causes and contexts, and the members of exception groups."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]


def disk_full_text(error: BaseException) -> str | None:
  """The first line of the full-disk error in `error`'s chain, or None."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
      where = f': {e.filename}' if e.filename else ''
      return f'{e.strerror or os.strerror(e.errno)}{where}'
    text = str(e)
    if any(t in text for t in DISK_FULL_TEXT):
      text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)  # TF's op
      return one_line(text.strip().splitlines()[0])[:400]
  return None


def failure_line(error: BaseException) -> tuple[str, int] | None:
  """(one line, exit status) for a failure the user can act on, else None.

  Status 2: the workdir cannot be used as asked (in use, not a folder,
  read-only, trained with another config) or an input data file is
  damaged (indexed.DataError, naming the file), as for a bad config; 1:
  the run failed on the way (a full disk, no checkpoint can be restored).
  """
  if isinstance(error, run_files.WorkdirError):
    return one_line(str(error)), 2
  damaged = [e for e in _chain(error) if isinstance(e, indexed.DataError)]
  if damaged:  # Also when raised in the input pipeline's threads.
    return one_line(str(damaged[0])), 2
  if isinstance(error, checkpoints.NoUsableCheckpointError):
    return one_line(str(error)), 1
  full = disk_full_text(error)
  if full:
    return (
      f'the disk is full ({full}). Free space and run the same command to '
      'resume from the last checkpoint',
      1,
    )
  return None


def exit_now(message: str, status: int):
  """`fail`, then ends the process at once (os._exit), skipping shutdown.

  After a failed asynchronous save, orbax's writer threads and asyncio's
  unretrieved tasks each print their copy of the error while the
  interpreter shuts down (hundreds of tracebacks for one full disk); the
  one line has been said, so nothing else runs. A held workdir lock is
  released by the kernel when the process ends.
  """
  try:
    fail(message, status)
  except SystemExit:
    pass
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def drop_repeated_errors() -> None:
  """sys.unraisablehook, less the copies of a failure main reports itself.

  When an asynchronous save fails (a full disk), orbax closes its event
  loop while tensorstore still completes the remaining writes; each
  completion calls into the closed loop from a C++ thread, and Python
  prints 'RuntimeError: Event loop is closed' through sys.unraisablehook
  (dozens of identical tracebacks). A generator closed by the failing
  step (the preemption guard's, which waits for the save) prints the
  full-disk error once more the same way. Both are dropped; every other
  unraisable error still reaches the previous hook.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    if error is not None and disk_full_text(error):
      return
    previous(unraisable)

  sys.unraisablehook = hook


def is_reported_later(record: logging.LogRecord) -> bool:
  """Whether a log record repeats a failure that ends in `failure_line`:
  orbax's background threads log a full disk (with a traceback each)
  before the error reaches the main thread."""
  if 'orbax' not in record.pathname or record.levelno < logging.ERROR:
    return False
  error = record.exc_info[1] if record.exc_info else None
  if error is not None and disk_full_text(error):
    return True
  return any(t in record.getMessage() for t in DISK_FULL_TEXT)
