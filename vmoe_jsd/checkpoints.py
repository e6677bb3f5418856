"""Checkpoints: orbax save/restore/resume, and vmoe's format.

Training state is saved with orbax's CheckpointManager under
WORKDIR/checkpoints/<step>/ (written to a temporary folder and renamed, so a
kill mid-save leaves the previous checkpoint intact). A run started again
with the same workdir restores the latest step onto the current device mesh
(the sharding of each array comes from the abstract target), and the data
order and random streams are re-derived from the step (see train.py).

vmoe's own checkpoint format (`.index` + `.data-NNNNN-of-NNNNN`) is read and
written by vmoe_format.py; `read_vmoe_checkpoint` is re-exported here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from vmoe_jsd.vmoe_format import (  # noqa: F401 - re-exported API
  match_tree,
  read_vmoe_checkpoint,
  write_vmoe_checkpoint,
)


class Checkpointer:
  """Periodic orbax checkpoints of a pytree state in WORKDIR/checkpoints.

  Attributes:
    directory: where step folders are written.
    every_steps: save when step % every_steps == 0 (and when forced).
    keep_last: how many checkpoints to keep.
  """

  def __init__(self, workdir: str, every_steps: int, keep_last: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.every_steps = every_steps
    self.keep_last = keep_last
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep_last,
        create=True,
        enable_async_checkpointing=False,
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves `state` as `step` if due (or forced); returns whether it did."""
    if not force and (not self.every_steps or step % self.every_steps):
      return False
    if step in self._manager.all_steps():
      return False
    self._manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(state))
    )
    self._manager.wait_until_finished()
    return True

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` onto the shardings/dtypes of `abstract_state`.

    Args:
      step: a saved step.
      abstract_state: pytree of jax.ShapeDtypeStruct with `sharding` set
        (e.g. from jax.eval_shape plus the target shardings).

    Returns:
      The restored state, placed as abstract_state describes.
    """
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
    )
    return restored['state']

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with the given shardings."""
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )
