"""What a run writes to its workdir, besides checkpoints and event files.

config.json, config_changes.jsonl, train_history.jsonl, results.json and
run.lock: docs/running.md's table says what each holds. Every JSON file is
strict JSON: a non-finite float is written as null (paths.finite_json). File
I/O of the trainer goes through these functions so that the storage backend
can change in one place.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import fnmatch
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vmoe_jsd import paths
from vmoe_jsd.config_errors import flatten
from vmoe_jsd.paths import read_json, write_json

CONFIG = 'config.json'
CONFIG_CHANGES = 'config_changes.jsonl'
HISTORY = 'train_history.jsonl'
RESULTS = 'results.json'
LOCK = 'run.lock'

# Keys a resume may change without --allow_config_change: they change how
# long the run trains, what it prints and saves, or where it finds its
# files, not the model it trains step by step. Everything else (seed,
# model, data, augmentation, optimizer, losses, NaN policy, evaluation
# contents) would splice two different runs into one checkpoint lineage.
# Patterns are fnmatch patterns over dotted keys ('*' also matches dots).
RESUMABLE_KEYS = (
  # Extending (or shortening) a run. The learning-rate schedule follows the
  # new length from the resumed step on (logged as a change).
  'num_train_steps',
  'train_epochs',
  # Cadence of the console, TensorBoard and evaluations, and what the
  # periodic reports add (norm summaries, the profiler window).
  'report_progress.*',
  'summaries.*',
  'evaluate.every_steps',
  'fewshot.every_steps',
  'profile.*',
  # Checkpoint cadence, retention and the write mode.
  'save_checkpoint.*',
  # Where the data is on this machine, and how many host threads decode it
  # (the examples and their order are functions of the seed and the step).
  '*.data_dir',
  '*.num_workers',
  # Read only when a run starts from step 0; a resume restores its state.
  'initialization.path',
  # The mesh layout on a machine with another number of devices: the loss,
  # gradients and parameters do not depend on it
  # (tests/test_vit_moe.py::test_mesh_matches_one_device_in_train_mode).
  'num_expert_partitions',
)


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked (one line of text)."""


class WorkdirInUseError(WorkdirError):
  """Another run holds the workdir's lock."""


class ConfigChangedError(WorkdirError):
  """A resume with a config that differs from the workdir's config.json."""


# --- JSON files (read_json and write_json: paths', strict JSON). ------------
def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
  """JSON Lines text of `rows`: strict JSON, one object per line."""
  return ''.join(paths.dumps_json(dict(r), default=str) + '\n' for r in rows)


def append_jsonl(path, rows: Iterable[Mapping[str, Any]]) -> None:
  """Appends one JSON object per line (flushed to disk locally)."""
  paths.append_text(path, jsonl_text(rows))


def read_jsonl(path) -> list[dict[str, Any]]:
  """The rows of a JSON Lines file; a last line cut short (a write that
  never finished) is left out."""
  return parse_jsonl(paths.read_bytes(path).decode())


def parse_jsonl(text: str) -> list[dict[str, Any]]:
  """read_jsonl's rows of JSON Lines `text`."""
  lines = [x for x in text.splitlines() if x.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise
  return rows


def write_config(workdir, config: Mapping[str, Any]) -> None:
  """workdir/config.json: the config as the run sees it (overrides applied),
  as a plain dict (RunSpec.config)."""
  write_json(paths.join(workdir, CONFIG), dict(config))


def finished_result(
  workdir: str, num_train_steps: int | None = None
) -> dict[str, Any] | None:
  """workdir's results.json if it comes from a run that trained to the end
  (of `num_train_steps` steps when given: a run extended with more steps is
  not finished), else None (still to train or evaluate)."""
  path = paths.join(workdir, RESULTS)
  if not paths.exists(path):
    return None
  try:
    result = read_json(path)
  except (OSError, ValueError):
    return None
  if not isinstance(result, Mapping) or 'accuracy' not in result:
    return None
  steps = result.get('num_train_steps')
  if steps is None or result.get('step') != steps:
    return None
  if num_train_steps and steps != num_train_steps:
    return None
  return result


# --- The workdir: made, checked and locked. ---------------------------------
def prepare_workdir(workdir: paths.PathLike):
  """Makes the workdir (and its parents); returns it as an epath.Path.

  Raises:
    WorkdirError: one line saying why it cannot be a folder (an existing
      file, a path under a file, a read-only or full file system).
  """
  try:
    out = paths.resolve(workdir)
  except ValueError as e:
    raise WorkdirError(f'--workdir={os.fspath(workdir)!r}: {e}') from None
  name = f'--workdir={os.fspath(workdir)}'
  if not paths.is_remote(out) and out.exists() and not out.is_dir():
    raise WorkdirError(f'{name} is a file, not a folder')
  try:
    return paths.makedirs(out)
  except FileExistsError:
    raise WorkdirError(f'{name} is a file, not a folder') from None
  except NotADirectoryError:
    parent = _file_above(out)
    raise WorkdirError(
      f'{name} cannot be made: {parent} is a file, not a folder'
    ) from None
  except OSError as e:
    raise WorkdirError(_os_error_line(name, e)) from None


def _file_above(path) -> str:
  """The first ancestor of local `path` that exists but is no folder."""
  for parent in reversed(paths.resolve(path).parents):
    if parent.exists() and not parent.is_dir():
      return str(parent)
  return str(path)


def _os_error_line(name: str, e: OSError) -> str:
  why = e.strerror or str(e)
  if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return f'{name} cannot be written: {why}'
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return f'{name}: the disk is full ({why})'
  return f'{name}: {why}'


class WorkdirLock:
  """An exclusive flock on WORKDIR/run.lock, held while the run lives.

  The kernel releases a flock when its process exits, however it exits
  (kill -9 included), so a lock left by a dead run never blocks the next
  one; the file stays, naming its last holder until the next run takes it.
  The file is never replaced (a rename would give the next run a new,
  unlocked file): the holder truncates it and writes its JSON line in place.
  """

  def __init__(self, workdir: paths.PathLike):
    self.path = os.path.join(os.fspath(paths.resolve(workdir)), LOCK)
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock or raises WorkdirInUseError naming the holder."""
    name = f'--workdir={os.path.dirname(self.path)}'
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(_os_error_line(name, e)) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirInUseError(
        f'{name} is in use by another run ({_holder_text(self.path)}); wait '
        'for it to end or stop it (a killed run releases the lock), or use '
        'another --workdir'
      ) from None
    except OSError as e:
      os.close(fd)
      raise WorkdirError(
        f'{name}: cannot lock {self.path} ({e.strerror}); this file system '
        'has no flock (see docs/running.md)'
      ) from None
    self._fd = fd
    holder = paths.dumps_json(holder_info()) + '\n'
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, holder.encode(), 0)
      os.fsync(fd)
    except OSError as e:
      self.release()
      raise WorkdirError(_os_error_line(name, e)) from None
    return self

  def release(self) -> None:
    """Releases the lock (the file is emptied, not removed)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)
    os.close(fd)  # Closing the last descriptor releases the flock.

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def holder_info() -> dict[str, Any]:
  """Who holds a lock: host, pid, start time (UTC) and command line."""
  now = datetime.datetime.now(datetime.timezone.utc)
  return {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'started': now.isoformat(timespec='seconds'),
    'command': shlex.join(sys.argv),
  }


def _holder_text(path: str, wait_s: float = 2.0) -> str:
  """'pid P on HOST, started T, command C' from a held lock file.

  The holder writes its line right after taking the lock: a run that
  lost a race by microseconds may find the file still empty, so it reads
  again for up to `wait_s`.
  """
  deadline = time.monotonic() + wait_s
  while True:
    try:
      with open(path, encoding='utf-8') as f:
        info = json.loads(f.read())
      return (
        f'pid {info["pid"]} on {info["host"]}, started {info["started"]}, '
        f'command: {info["command"]}'
      )
    except (OSError, ValueError, KeyError, TypeError):
      if time.monotonic() > deadline:
        return f'its holder did not write its name in {path}'
      time.sleep(0.05)


def on_process_0(fn: Callable[[], Any], what: str) -> Any:
  """Runs `fn` on process 0; every process raises if it raised there.

  A WorkdirError raised by `fn` on process 0 is raised again there; the
  other processes learn of it through one broadcast and raise a
  WorkdirError naming `what`, so that no process goes on alone to wait
  in a collective. Single-process runs make no collective call.

  Returns:
    fn()'s value on process 0, None on the other processes.
  """
  error, out = None, None
  if jax.process_index() == 0:
    try:
      out = fn()
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not int(ok) and error is None:
      raise WorkdirError(
        f'process 0 refused to start: {what} (its error line says why)'
      )
  if error is not None:
    raise error
  return out


@contextlib.contextmanager
def lock_workdir(workdir: paths.PathLike, log=print) -> Iterator[None]:
  """Holds the workdir's lock (WorkdirLock) on process 0 for the block.

  A gs:// workdir is not locked: object stores have no lock that a killed
  holder releases, so one line says so and the run goes on (docs/running.md).

  Raises:
    WorkdirInUseError: another run holds it (on every process).
    WorkdirError: the lock file cannot be written.
  """
  if paths.is_remote(workdir):
    if jax.process_index() == 0:
      log(
        f'WARNING: {workdir} is not locked (remote workdirs cannot be): '
        'never start two runs on it at once.'
      )
    yield
    return
  lock = on_process_0(
    lambda: WorkdirLock(workdir).acquire(),
    'the workdir is in use or cannot be written',
  )
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


# --- Resuming: the config must be the one the workdir was trained with. -----
_ABSENT = '<absent>'


def config_changes(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} of the keys that differ.

  Both configs are compared as config.json holds them (tuples as lists,
  non-finite floats as null); a key only one of them has is a change
  from or to '<absent>'.
  """
  old_flat, new_flat = (
    flatten(json.loads(paths.dumps_json(dict(c), default=str)))
    for c in (old, new)
  )
  pairs = (
    (k, (old_flat.get(k, _ABSENT), new_flat.get(k, _ABSENT)))
    for k in sorted(set(old_flat) | set(new_flat))
  )
  return {k: (a, b) for k, (a, b) in pairs if a != b}


def may_change_on_resume(key: str) -> bool:
  """Whether `key` is one of RESUMABLE_KEYS."""
  return any(fnmatch.fnmatchcase(key, p) for p in RESUMABLE_KEYS)


def has_checkpoints(workdir: paths.PathLike) -> bool:
  """Whether workdir/checkpoints holds a step folder (not a temporary or
  set-aside one)."""
  folder = paths.join(workdir, 'checkpoints')
  return paths.isdir(folder) and any(n.isdigit() for n in paths.listdir(folder))


def _describe(changes: Mapping[str, tuple[Any, Any]], limit: int = 12) -> str:
  items = [f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items()]
  more = len(items) - limit
  return '; '.join(items[:limit]) + (f'; and {more} more' if more > 0 else '')


def check_resume_config(
  workdir: paths.PathLike,
  config: Mapping[str, Any],
  allow_change: bool = False,
  log=print,
  record: bool = True,
) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the config.json of a workdir that has trained.

  Nothing is checked when the workdir has no config.json or no checkpoint
  yet (nothing of the old run would be reused). Keys in RESUMABLE_KEYS may
  differ; a key that only one of the two configs has (an option the code
  gained or lost since: new options default to off and keep the numbers)
  is named but not refused; any other difference is refused unless
  `allow_change` (main's --allow_config_change). Every accepted change is
  logged and recorded in config_changes.jsonl, unless not `record` (a
  finished workdir that will not train again).

  Returns:
    The changes accepted ({key: (old, new)}, '<absent>' for a missing key).

  Raises:
    ConfigChangedError: one line listing the keys that may not change,
      with their old and new values.
  """
  path = paths.join(workdir, CONFIG)
  if not paths.isfile(path) or not has_checkpoints(workdir):
    return {}
  try:
    old = read_json(path)
  except ValueError as e:
    if not allow_change:
      raise ConfigChangedError(
        f'{path} is not readable JSON ({e}); cannot tell whether this '
        'resume keeps its config. Repair it, or pass --allow_config_change'
      ) from None
    old = {}
  changes = config_changes(old, config)
  options = {k for k, (a, b) in changes.items() if _ABSENT in (a, b)}
  fixed = {
    k: v
    for k, v in changes.items()
    if k not in options and not may_change_on_resume(k)
  }
  if fixed and not allow_change:
    raise ConfigChangedError(
      f'--workdir={os.fspath(workdir)} was trained with another config '
      f'({path}); resuming would splice two runs: {_describe(fixed)}. Use '
      'another --workdir, or pass --allow_config_change to resume with the '
      'new values'
    )
  if changes and record:
    _log_changes(changes, options, bool(fixed), log)
    now = datetime.datetime.now(datetime.timezone.utc)
    row = {
      'time': now.isoformat(timespec='seconds'),
      'forced': bool(fixed),
      'changes': {k: {'old': a, 'new': b} for k, (a, b) in changes.items()},
    }
    append_jsonl(paths.join(workdir, CONFIG_CHANGES), [row])
  return changes


def _log_changes(changes, options, forced: bool, log) -> None:
  values = {k: v for k, v in changes.items() if k not in options}
  if values:
    prefix = 'WARNING: resuming with a changed config (--allow_config_change)'
    log(f'{prefix if forced else "Resuming with"}: {_describe(values, 50)}.')
  if options:
    names = sorted(options)
    more = f' and {len(names) - 12} more' if len(names) > 12 else ''
    log(
      f'Resuming with {len(names)} key(s) that only one of config.json and '
      'this config has (options added or removed since): '
      f'{", ".join(names[:12])}{more}.'
    )


# --- The history, written as it goes. ---------------------------------------
class History:
  """train_history.jsonl: one row per progress report, appended at once.

  Each row also records `train_seconds`, the training time (without
  compilation) of the run up to that step, across resumed segments. A run
  resumed from step N keeps the rows up to N (`rows`) and drops the later
  ones, which it trains and reports again, so no step appears twice.
  """

  def __init__(
    self,
    path,
    start_step: int,
    enabled: bool = True,
    seconds_fn: Callable[[], float] | None = None,
  ):
    self.path, self.enabled, self.seconds_fn = path, enabled, seconds_fn
    self.rows: list[dict[str, Any]] = []
    if not enabled or not paths.exists(path):
      return
    text = paths.read_bytes(path).decode()
    self.rows = [r for r in parse_jsonl(text) if r.get('step', 0) <= start_step]
    kept = jsonl_text(self.rows)
    if kept != text:  # Later rows, a cut last line, an older encoding.
      paths.write_bytes(path, kept.encode())

  def append(self, row: Mapping[str, Any]) -> None:
    row = dict(row)
    if self.seconds_fn is not None:
      row['train_seconds'] = self.seconds_fn()
    self.rows.append(row)
    if self.enabled:
      append_jsonl(self.path, [row])

  def __iter__(self):
    return iter(self.rows)

  def __len__(self) -> int:
    return len(self.rows)

  def train_seconds_until(self, step: int, batch_size: int) -> float:
    """The training time of steps 1..step by the kept rows.

    The last row at or before `step` gives its `train_seconds`; steps
    after it (a checkpoint between two reports, a stop by signal) are
    counted at that row's images/s. 0 when no row has `train_seconds`
    (a workdir written before they were recorded).
    """
    rows = [
      r
      for r in self.rows
      if r.get('step', 0) <= step and r.get('train_seconds') is not None
    ]
    if not rows:
      return 0.0
    last = rows[-1]
    rate = last.get('images_per_second') or 0.0
    gap = (step - last['step']) * batch_size / rate if rate > 0 else 0.0
    return float(last['train_seconds']) + gap


# --- TensorBoard. -----------------------------------------------------------
def metric_writer(workdir: str, is_main: bool):
  """TensorBoard event files in workdir (process 0), no console copy.

  clu's default writer also logs every scalar through absl; the progress
  line of the trainer is the console's copy.
  """
  # clu's writers import TensorFlow: only when a run writes events.
  from clu import metric_writers  # noqa: PLC0415 - imports TensorFlow

  if not is_main:
    return metric_writers.MultiWriter([])
  return metric_writers.SummaryWriter(workdir)
