"""Our orbax checkpoints: save, restore and resume; read only the params.

Steps go to WORKDIR/checkpoints/<step>/ (locally or on GCS); a kill mid-save
leaves the previous step intact. A run started again restores the newest
step that can be read and is intact (integrity.py); a damaged one is
reported in one line, left in place and the previous one tried
(docs/checkpoints_and_storage.md).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vmoe_jsd import paths, run_files
from vmoe_jsd.checkpoints import integrity
from vmoe_jsd.checkpoints.tree import flatten_tree, unflatten_tree
from vmoe_jsd.config_errors import check_range, reject, to_dict

DAMAGED_SUFFIX = '.damaged'


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """config.save_checkpoint.

  Attributes:
    every_steps: save every N steps (0: only at the end and on a stop).
    keep_last: how many checkpoints to keep (>= 1).
    asynchronous: write files in the background while training goes on.
  """

  every_steps: int = 0
  keep_last: int = 2
  asynchronous: bool = True

  @classmethod
  def from_config(cls, cfg: Mapping | None) -> CheckpointSpec:
    cfg = to_dict(cfg)
    every, keep = cfg.get('every_steps', 0), cfg.get('keep_last', 2)
    check_range('save_checkpoint.every_steps', every, 0, integer=True)
    check_range('save_checkpoint.keep_last', keep, 1, integer=True)
    asynchronous = cfg.get('asynchronous', True)
    if not isinstance(asynchronous, bool):
      reject('save_checkpoint.asynchronous', asynchronous, 'True or False')
    return cls(every, keep, asynchronous)


class NoUsableCheckpointError(RuntimeError):
  """The workdir holds checkpoints, but none of them can be restored."""


class Checkpointer:
  """Periodic orbax checkpoints of a pytree state in WORKDIR/checkpoints.

  Attributes:
    directory: where step folders are written (an epath.Path).
    every_steps: save when step % every_steps == 0 (and when forced).
    damaged: {step: error message} of checkpoints found unreadable (or
      whose data differs from its checksums, or is not finite).
  """

  def __init__(
    self,
    workdir: paths.PathLike,
    every_steps: int,
    keep_last: int = 2,
    asynchronous: bool = True,
    log: Callable[[str], None] = print,
  ):
    self.directory = paths.join(workdir, 'checkpoints')
    if self.directory.exists() and not self.directory.is_dir():
      raise run_files.WorkdirError(
        f'{self.directory} is a file, not a folder: the checkpoints of the '
        'run go there. Move it away or use another --workdir.'
      )
    _quiet_closed_event_loop()
    self.every_steps = every_steps
    self.damaged: dict[int, str] = {}
    self._log = log
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep_last,
        create=True,
        enable_async_checkpointing=asynchronous,
      ),
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def is_due(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
    """Starts saving `state` as `step` if due (or forced).

    A step that already holds a good checkpoint is not written again; one
    that holds a damaged checkpoint (found by `restore_latest`) is first
    renamed to `<step>.damaged` (kept for inspection, out of orbax's way).
    The CRC-32C of every array is saved with it (before this returns, so
    the state may be changed or donated afterwards).

    Returns:
      Whether a save was started (with asynchronous saving the files are
      complete only after `wait`).

    Raises:
      FloatingPointError: `state` holds NaN or Inf (nothing is saved, so the
        older good checkpoints stay: a NaN state would push them out of the
        `keep_last` window).
    """
    if not force and not self.is_due(step):
      return False
    if step in self.damaged:
      self._set_aside(step)
    elif step in self._manager.all_steps():
      return False
    checksums, non_finite = integrity.integrity_summary(state)
    if non_finite:
      raise FloatingPointError(
        f'Not saving the checkpoint of step {step}: '
        f'{integrity.first_of(non_finite)} holds NaN or Inf (the older '
        'checkpoints are kept). Lower the learning rate or check the data.'
      )
    record = ocp.args.JsonSave(integrity.integrity_record(checksums))
    items = {'state': ocp.args.StandardSave(state)}
    items[integrity.INTEGRITY_ITEM] = record
    self._manager.save(step, args=ocp.args.Composite(**items))
    return True

  def wait(self) -> None:
    """Blocks until the last save has been written (and raises its error)."""
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` onto the shardings/dtypes of `abstract_state` (a
    pytree of jax.ShapeDtypeStruct with `sharding` set, e.g. from
    `abstract_like`), and checks it against its checksums (a collective on
    several processes).

    Raises:
      IntegrityError: the data differs from its checksums, or is not finite.
    """
    state, record = self._read(step, abstract_state)
    problem = integrity.integrity_problem(state, record)
    if problem:
      raise integrity.IntegrityError(f'checkpoint at step {step}: {problem}')
    return state

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int | None]:
    """Restores the newest checkpoint that can be read and is intact.

    Unreadable checkpoints, and those whose data differs from its saved
    checksums or is not finite, are reported (step and error, in one line),
    recorded in `self.damaged` and left in place; the next older one is
    tried. All processes agree on the outcome of every attempt. Checkpoints
    saved before checksums were recorded restore with a one-line note.
    `abstract_state` as for `restore`.

    Returns:
      (state, step), or (None, None) when there is no checkpoint at all.

    Raises:
      NoUsableCheckpointError: checkpoints exist but none can be restored.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      try:
        state, record = self._read(step, abstract_state)
        error = ''
      except Exception as e:  # noqa: BLE001 - any failure means unusable.
        state, record, error = None, None, error_line(e)
      error = _agreed_error(error)
      if not error:  # Every process takes part in the check (a collective).
        error = _agreed_error(integrity.integrity_problem(state, record))
      if not error:
        if record is None:
          self._log(
            f'Note: the checkpoint at step {step} has no checksums '
            '(saved before they were recorded); restored without '
            'verifying its data (it is finite).'
          )
        return state, step
      self.damaged[step] = error
      older = [s for s in steps if s < step]
      self._log(
        f'WARNING: checkpoint at step {step} in {self.directory} cannot be '
        f'restored ({error}); left in place. '
        + (f'Trying step {older[0]}.' if older else 'No older checkpoint.')
      )
    if steps:
      problems = '; '.join(f'step {s}: {self.damaged[s]}' for s in steps)
      raise NoUsableCheckpointError(
        f'None of the checkpoints in {self.directory} can be restored '
        f'({problems}). Not starting from scratch over them: repair or '
        'move away that folder (or use another --workdir) to start anew.'
      )
    return None, None

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
    """(state, integrity record or None if the step has none), unchecked.

    Reads through orbax's handlers, not `CheckpointManager.restore`: that
    ends with a barrier of all processes, which a process whose read failed
    never reaches, so the others would wait there while it waits in the
    agreement on the outcome (`_agreed_error`).
    """
    self.wait()
    folder = self.directory / str(step)
    record = integrity.read_integrity_record(folder)
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(
        folder / 'state', args=ocp.args.StandardRestore(abstract_state)
      )
    finally:
      handler.close()
    return state, record

  def close(self) -> None:
    """Waits for the last save and releases orbax's resources."""
    self.wait()
    self._manager.close()

  def _set_aside(self, step: int) -> None:
    source = self.directory / str(step)
    target = self.directory / f'{step}{DAMAGED_SUFFIX}'
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f'{step}{DAMAGED_SUFFIX}{n}'
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'vmoe_jsd_set_aside_{step}')
    self._manager.reload()
    del self.damaged[step]
    self._log(
      f'Moved the damaged checkpoint of step {step} to {target} to save '
      'this step again.'
    )


def error_line(error: BaseException) -> str:
  """'Type: first line of the message' (at most 300 characters of it)."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: ' + (
    text[0][:300] if text else '(no message)'
  )


def _agreed_error(error: str, max_bytes: int = 400) -> str:
  """'' if no process has an error, else the first failing process's error
  (named 'process i: ...' on several processes), the same on every process
  (a collective on multi-process runs: the texts travel as bytes)."""
  if jax.process_count() == 1:
    return error
  data = np.zeros(max_bytes, np.uint8)
  text = error.encode('utf-8', 'replace')[:max_bytes]
  data[: len(text)] = np.frombuffer(text, np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(data))
  for i, row in enumerate(everyone.reshape(jax.process_count(), -1)):
    if row.any():
      message = bytes(row).rstrip(b'\0').decode('utf-8', 'replace')
      return f'process {i}: {message}'
  return ''


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with the given shardings."""
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )


def _quiet_closed_event_loop() -> None:
  """Drops the echoes of a failed read or write that orbax leaves behind.

  After one failed read or write, orbax closes its asyncio loop while
  tensorstore completes the other requests: each callback raises
  RuntimeError('Event loop is closed') into sys.unraisablehook, and the
  other failing reads end there unawaited, with 60 lines of TensorStore spec
  each, around the one error that matters (which orbax raises). Other
  unraisable errors go to the hook that was there before.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'quiet_closed_event_loop', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    code = getattr(getattr(unraisable, 'object', None), 'cr_code', None)
    if code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename:
      return  # The other reads of a failed one, never awaited.
    previous(unraisable)

  hook.quiet_closed_event_loop = True
  sys.unraisablehook = hook


# ----------------------------------------------------------------------------
# Only the params, as numpy.
# ----------------------------------------------------------------------------
def orbax_state_candidates(path: str) -> tuple[list, dict[int, str]]:
  """The orbax 'state' item folders `path` may mean, newest first: for a
  workdir (with checkpoints/) or a checkpoints/ folder, every step folder
  there with state/_METADATA; for a step folder (with state/) or the state/
  item folder itself, just that one.

  Returns:
    ([(folder of the 'state' item, step number or None), ...], incomplete):
    incomplete maps the steps of step folders without state/_METADATA
    (half-written, or not checkpoints) to why they were left out.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if no checkpoint is found there.
  """
  if not paths.exists(path):
    raise FileNotFoundError(
      errno.ENOENT, 'orbax checkpoint path does not exist', path
    )
  root = paths.resolve(path)

  def is_item(folder) -> bool:
    return (folder / '_METADATA').is_file()

  def step_of(folder) -> int | None:
    return int(folder.name) if folder.name.isdigit() else None

  if is_item(root):
    return [(str(root), step_of(root.parent))], {}
  if is_item(root / 'state'):
    return [(str(root / 'state'), step_of(root))], {}
  incomplete: dict[int, str] = {}
  for folder in (root, root / 'checkpoints'):
    if not folder.is_dir():
      continue
    steps = []
    for entry in folder.iterdir():
      if not (entry.name.isdigit() and entry.is_dir()):
        continue
      if is_item(entry / 'state'):
        steps.append(int(entry.name))
      else:
        why = 'no state/_METADATA (half-written, or not a checkpoint)'
        incomplete[int(entry.name)] = why
    if steps:
      return [
        (str(folder / str(step) / 'state'), step)
        for step in sorted(steps, reverse=True)
      ], incomplete
  raise ValueError(
    f'No orbax checkpoint found at {path!r}: expected a workdir with '
    'checkpoints/<step>/state/, a checkpoints/ folder, a step folder with '
    'state/, or a state/ folder with _METADATA.'
    + (f' Incomplete step folders: {sorted(incomplete)}.' if incomplete else '')
  )


def find_orbax_state_dir(path: str) -> str:
  """The newest orbax 'state' item folder under `path` (see above)."""
  return orbax_state_candidates(path)[0][0]


class _NoParamsError(ValueError):
  """A readable checkpoint without params: not damage, so no fallback."""


def _read_state_params(directory: str) -> dict:
  handler = ocp.PyTreeCheckpointHandler()
  try:
    structure = handler.metadata(paths.resolve(directory)).tree
    nested = isinstance(structure.get('params'), Mapping)
    if not nested and 'Encoder' not in structure:
      raise _NoParamsError(
        f'The orbax checkpoint {directory!r} has no params: its top-level '
        f'keys are {sorted(structure)}.'
      )
    meta = {'params': structure['params']} if nested else structure
    restored = handler.restore(
      paths.resolve(directory),
      args=ocp.args.PyTreeRestore(
        item=jax.tree_util.tree_map(lambda _: 0, meta),
        restore_args=jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta
        ),
        partial_restore=True,
      ),
    )
  finally:
    handler.close()
  # The CRC-32C of every array saved with the step (integrity.py): a
  # damaged step is an unreadable one (an older one is tried for a workdir).
  # `restored` is named as in the saved state.
  record = integrity.read_integrity_record(paths.resolve(directory).parent)
  problem = integrity.integrity_problem(restored, record, exchange=False)
  if problem:
    raise integrity.IntegrityError(f'orbax checkpoint {directory!r}: {problem}')
  params = restored['params'] if nested else restored
  return unflatten_tree(flatten_tree(params))


def read_orbax_params(path: str) -> tuple[dict, dict[str, Any]]:
  """Reads only the params of one of our orbax checkpoints, as numpy.

  A partial restore driven by the checkpoint's own metadata: no target, no
  mesh, no optimizer state. Given a workdir or a checkpoints/ folder, the
  newest step that can be read and is intact (damaged ones as in
  `Checkpointer.restore_latest`, recorded in 'skipped'); an explicit step
  or state/ folder is read or fails, never replaced by another step.

  Returns:
    (params as a nested dict of numpy arrays, {'directory', 'step',
    'skipped': {step: why it could not be read}}).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if there is no checkpoint, none can be read (each step's
      error is named), or the one read has no params.
  """
  candidates, skipped = orbax_state_candidates(path)
  explicit = len(candidates) == 1 and not skipped
  for directory, step in candidates:
    try:
      info = {'directory': directory, 'step': step, 'skipped': skipped}
      return _read_state_params(directory), info
    except Exception as e:  # noqa: BLE001 - any failure means unreadable.
      if explicit or isinstance(e, _NoParamsError):
        raise
      skipped[step] = error_line(e)
      logging.warning(
        'Checkpoint at step %s under %s cannot be read (%s); left in '
        'place, trying an older one.',
        step,
        path,
        skipped[step],
      )
  problems = '; '.join(f'step {s}: {skipped[s]}' for s in sorted(skipped))
  raise ValueError(
    f'None of the checkpoints under {path!r} can be read ({problems}).'
  )
