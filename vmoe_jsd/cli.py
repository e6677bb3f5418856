"""Command-line plumbing shared by main, eval_main and sweep.

- `parse_flags`: absl's flag parser for `app.run`, but a missing config file,
  a misspelt key or a value of the wrong type ends the program with ONE line
  on stderr (exit status 2) instead of a traceback; a missing config file
  lists the configs that exist.
- `load_config`: the same parsing on a private FlagValues (for tests and
  tools), raising `CliError`.
- `check_config`: `config_lib.validate` (its RunSpec) with its error turned
  into one line.
- `quiet_console`: TensorFlow's start-up banners (printed by its C++ logging,
  which ignores TF_CPP_MIN_LOG_LEVEL in TF 2.21) and absl INFO records from
  libraries (clu's metric copies, jax's backend probing, orbax) stay off the
  console; warnings and errors still show.
- `describe_devices`: the backend and devices, and a warning when a GPU is
  visible to the machine but JAX runs on the CPU.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import os
import sys
from collections.abc import Sequence

import jax
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vmoe_jsd import config_lib

REPO_CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs'
)


class CliError(Exception):
  """A problem with the command line or the config, as one line of text."""


def fail(message: str, status: int = 2):
  """Prints `prog: error: message` (one line) to stderr and exits."""
  prog = os.path.basename(sys.argv[0]) if sys.argv else ''
  prog = f'vmoe_jsd.{prog[:-3]}' if prog.endswith('.py') else 'vmoe_jsd'
  print(f'{prog}: error: {one_line(message)}', file=sys.stderr, flush=True)
  sys.exit(status)


def one_line(message: str) -> str:
  """Collapses a (possibly multi-line) message into one line."""
  return ' '.join(str(message).split())


# ----------------------------------------------------------------------------
# Config files and flags.
# ----------------------------------------------------------------------------
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


def _flat_keys(config, prefix: str = '') -> list[str]:
  keys = []
  for key in config.keys():
    value = config[key]
    if hasattr(value, 'keys') and callable(value.keys):
      keys += _flat_keys(value, f'{prefix}{key}.')
    else:
      keys.append(f'{prefix}{key}')
  return keys


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
    name, None, 'config file', flag_values=fv, lock_config=True,
    sys_argv=list(argv),
  )  # fmt: skip
  fv(list(argv), known_only=False)
  return holder.value


def _unknown_key_line(argv: Sequence[str], name: str) -> str | None:
  """'config has no key ...' for the first override naming no config key."""
  prefix = f'--{name}.'
  argv = _config_argv(argv, name)
  overrides = [a[len(prefix) :].split('=')[0] for a in argv
               if a.startswith(prefix)]  # fmt: skip
  try:
    plain = [a for a in argv if not a.startswith(prefix)]
    keys = _flat_keys(_parse(plain, name))
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
  if 'Traceback (most recent call last)' in text:
    # config_flags embeds the traceback of get_config(); keep its last line.
    lines = [x for x in text.splitlines() if x.strip()]
    text = f'{lines[0].split(":")[0]}: {lines[-1].strip()}'
  if not isinstance(error, flags.Error):
    text = f'{type(error).__name__}: {text}'
  return one_line(text)


def load_config(argv: Sequence[str], name: str = 'config'):
  """Parses `argv` (program name first) with a private FlagValues.

  Args:
    argv: e.g. ['prog', '--config=configs/default.py:runlocal',
      '--config.seed=1'].
    name: the config flag's name.

  Returns:
    The locked ConfigDict, overrides applied.

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


# ----------------------------------------------------------------------------
# Console.
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def _stderr_to_devnull():
  """Redirects file descriptor 2 (C++ writers included) to /dev/null."""
  sys.stderr.flush()
  saved = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


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
  try:
    with _stderr_to_devnull():
      import tensorflow  # noqa: F401, PLC0415 - optional; banners muted
  except ImportError:
    pass  # TF is optional for the pure-JAX paths.


def visible_gpus() -> list[str]:
  """NVIDIA GPU device files on this machine (empty when none)."""
  return sorted(glob.glob('/dev/nvidia[0-9]*'))


def describe_devices() -> list[str]:
  """Lines naming JAX's backend and devices (and a warning if a GPU idles)."""
  backend = jax.default_backend()
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  lines = [
    f'JAX {jax.__version__} backend: {backend}; {jax.device_count()} '
    f'device(s) ({", ".join(kinds)}) on {jax.process_count()} process(es).'
  ]
  if backend == 'cpu' and visible_gpus():
    lines.append(
      f'WARNING: this machine has GPU device files ({len(visible_gpus())}: '
      f'{", ".join(visible_gpus()[:4])}) but JAX runs on the CPU. Install the '
      'CUDA build with ./setup.sh --accelerator=gpu.'
    )
  return lines
