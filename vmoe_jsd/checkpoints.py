"""Checkpoints: orbax save/restore/resume, and vmoe's format.

Training state is saved with orbax's CheckpointManager under
WORKDIR/checkpoints/<step>/, locally or on GCS (paths go through
`etils.epath`, see paths.py). Locally each step is written to a temporary
folder and renamed; on GCS orbax marks a finished step with
`commit_success.txt`. Either way a kill mid-save leaves the previous
checkpoint intact.

Saving is asynchronous by default (`config.save_checkpoint.asynchronous`):
`save` returns once the arrays are copied off the devices, and the files are
written by a background thread while training goes on. Every save waits for
the previous one; `close` (and so the end of a run, a preemption stop and
the exception path) waits for the last.

A run started again with the same workdir restores the newest step that can
be read onto the current device mesh (the sharding of each array comes from
the abstract target); the data order and random streams are re-derived from
the step (see train.py). A checkpoint that cannot be read (a truncated or
missing file, a half-written folder) is reported with its step and error,
left where it is, and the previous one is tried; if none can be read the run
stops with `NoUsableCheckpointError` rather than starting from scratch.

vmoe's own checkpoint format (`.index` + `.data-NNNNN-of-NNNNN`) is read and
written by vmoe_format.py; `read_vmoe_checkpoint` is re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vmoe_jsd import paths
from vmoe_jsd.config_errors import check_range, fail, to_dict
from vmoe_jsd.vmoe_format import (  # noqa: F401 - re-exported API
  match_tree,
  read_vmoe_checkpoint,
  write_vmoe_checkpoint,
)

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
      fail('save_checkpoint.asynchronous', asynchronous, 'True or False')
    return cls(every, keep, asynchronous)


class NoUsableCheckpointError(RuntimeError):
  """The workdir holds checkpoints, but none of them can be restored."""


class Checkpointer:
  """Periodic orbax checkpoints of a pytree state in WORKDIR/checkpoints.

  Attributes:
    directory: where step folders are written (an epath.Path).
    every_steps: save when step % every_steps == 0 (and when forced).
    keep_last: how many checkpoints to keep.
    asynchronous: whether saves write files in the background.
    damaged: {step: error message} of checkpoints found unreadable.
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
    self.every_steps = every_steps
    self.keep_last = keep_last
    self.asynchronous = asynchronous
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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def is_due(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
    """Starts saving `state` as `step` if due (or forced).

    A step that already holds a good checkpoint is not written again; one
    that holds a damaged checkpoint (found by `restore_latest`) is first
    renamed to `<step>.damaged` (kept for inspection, out of orbax's way).

    Returns:
      Whether a save was started (with asynchronous saving the files are
      complete only after `wait`).
    """
    if not force and not self.is_due(step):
      return False
    if step in self.damaged:
      self._set_aside(step)
    elif step in self._manager.all_steps():
      return False
    self._manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(state))
    )
    return True

  def wait(self) -> None:
    """Blocks until the last save has been written (and raises its error)."""
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` onto the shardings/dtypes of `abstract_state`.

    Args:
      step: a saved step.
      abstract_state: pytree of jax.ShapeDtypeStruct with `sharding` set
        (e.g. from jax.eval_shape plus the target shardings).

    Returns:
      The restored state, placed as abstract_state describes.
    """
    self.wait()
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
    )
    return restored['state']

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int | None]:
    """Restores the newest checkpoint that can be read.

    Unreadable checkpoints are reported (step and error), recorded in
    `self.damaged` and left in place; the next older one is tried. All
    processes agree on the outcome of every attempt.

    Args:
      abstract_state: as for `restore`.

    Returns:
      (state, step), or (None, None) when there is no checkpoint at all.

    Raises:
      NoUsableCheckpointError: checkpoints exist but none can be restored.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      error = ''
      try:
        state = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - any failure means unusable.
        state = None
        error = f'{type(e).__name__}: {_first_line(e)}'
      if _all_processes_succeeded(not error):
        return state, step
      error = error or 'another process could not read its part'
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

  def close(self) -> None:
    """Waits for the last save and releases orbax's resources."""
    self._manager.wait_until_finished()
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
    _sync(f'vmoe_jsd_set_aside_{step}')
    self._manager.reload()
    del self.damaged[step]
    self._log(
      f'Moved the damaged checkpoint of step {step} to {target} to save '
      'this step again.'
    )


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else '(no message)'


def _all_processes_succeeded(ok: bool) -> bool:
  """True iff `ok` on every process (a collective on multi-process runs)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.int32(ok))
  return bool(np.all(flags))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with the given shardings."""
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )
