"""Preemption and non-finite losses: what a long run does when things fail.

Preemption (TPU VM maintenance, SLURM preemption and `scancel` send
SIGTERM; Ctrl-C sends SIGINT): `PreemptionGuard` turns the signal into a
request that the train loop sees at a step boundary. The loop then saves a
checkpoint of the step it has just finished, waits for it to be written and
returns; `main` exits with status 0 and a message. On one process a signal
handler sets a flag. On several processes the hosts must stop at the same
step, so the guard asks JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`): the coordination service
hears the SIGTERM of any host and names a step all hosts reach. A second
SIGINT interrupts at once (KeyboardInterrupt), as usual.

Non-finite loss (`config.nan_policy`):
- 'stop': the run stops at the next progress report or checkpoint with a
  message naming the step and the non-finite terms; nothing is saved.
- 'skip': inside the jitted step, an update whose total loss or gradient
  norm is not finite is not applied (parameters and optimizer state stay as
  they were, selected with `jnp.where`, so no host sync); the step counter
  still advances, the step is counted in the `skipped_steps` metric and the
  run goes on. Data and random streams are functions of the step, so a
  deterministic NaN would come back at the same step after every restart
  under 'stop': a job that is requeued automatically should use 'skip'.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

NAN_POLICIES = ('stop', 'skip')


class PreemptionGuard:
  """Turns SIGTERM (and a first SIGINT) into a stop at a step boundary.

  The train loop iterates `for step in guard.steps(start, end):`; the
  signal handlers are installed while it runs. After the body of a step
  the guard asks whether to stop; if so the loop ends and `stopped_at`
  holds that step, whose checkpoint the caller then saves.

  Attributes:
    signal_name: name of the signal received ('' when none).
    stopped_at: the last step run before a requested stop, else None.
  """

  def __init__(self):
    self.signal_name = ''
    self.stopped_at: int | None = None
    self._requested = threading.Event()
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    self._warned = False

  def steps(
    self,
    start_step: int,
    num_steps: int,
    on_exit: Callable[[], None] | None = None,
  ) -> Iterator[int]:
    """Yields start_step + 1 ... num_steps until a stop is requested.

    Args:
      start_step: the step the state is at (0, or the restored step).
      num_steps: the last step.
      on_exit: called when the loop ends, also by an exception in its
        body (the generator is closed then): e.g. wait for pending saves.

    Yields:
      The step numbers to run.
    """
    self.install()
    try:
      for step in range(start_step + 1, num_steps + 1):
        yield step
        if step < num_steps and self.should_stop(step):
          self.stopped_at = step
          return
    finally:
      self.uninstall()
      if on_exit is not None:
        on_exit()

  def install(self) -> None:
    """Installs the signal handlers (main thread, single process only)."""
    if threading.current_thread() is not threading.main_thread():
      return  # Python only delivers signals to the main thread.
    # On several processes JAX's preemption notifier owns SIGTERM (it
    # propagates it to all hosts; a Python handler would replace it), and a
    # SIGINT on one host cannot name a step the others agree on: it keeps
    # its default (KeyboardInterrupt).
    wanted = [] if self._multi else [signal.SIGTERM, signal.SIGINT]
    for sig in wanted:
      if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
        # Started with SIGINT ignored (nohup, a background job of a
        # non-interactive shell): whoever started us chose that; keep it.
        continue
      self._previous[sig] = signal.signal(sig, self._handle)

  def uninstall(self) -> None:
    """Puts the previous signal handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      # The next Ctrl-C interrupts at once.
      signal.signal(signal.SIGINT, self._previous.get(signum, signal.SIG_DFL))
    self._requested.set()
    print(
      f'Received {self.signal_name}: finishing this step, then saving a '
      'checkpoint and exiting.',
      file=sys.stderr,
      flush=True,
    )

  def request(self, name: str = 'request') -> None:
    """Asks for a stop as a signal would (single process)."""
    self.signal_name = name
    self._requested.set()

  def should_stop(self, step: int) -> bool:
    """Whether to save `step` and stop now (same answer on all processes).

    Must be called after every step on every process: on several processes
    it is JAX's preemption sync point, which needs to see every step.
    """
    if self._multi:
      try:
        reached = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # jax_enable_preemption_service=False.
        if not self._warned:
          self._warned = True
          print(f'WARNING: no preemption sync ({e}); SIGTERM will not '
                'save a checkpoint.', file=sys.stderr, flush=True)  # fmt: skip
        return False
      if reached:
        self.signal_name = self.signal_name or 'SIGTERM'
      return reached
    return self._requested.is_set()


def apply_nan_policy(
  policy: str, old_state, new_state, metrics: dict[str, jax.Array]
):
  """Under 'skip', keeps `old_state`'s parameters if the step is not finite.

  Traced inside the train step. The step is finite when the total loss and
  the global gradient norm (`metrics['total_loss']`, `metrics['grad_norm']`)
  are finite; otherwise params and opt_state come from `old_state` (the step
  counter still advances) and `metrics['skipped']` is 1.

  Args:
    policy: config.nan_policy.
    old_state: the TrainState the step started from.
    new_state: the TrainState after the update.
    metrics: the step's metrics (a 'skipped' entry is added under 'skip').

  Returns:
    The state to continue from.
  """
  if policy == 'stop':
    return new_state
  finite = jnp.isfinite(metrics['total_loss']) & jnp.isfinite(
    metrics['grad_norm']
  )
  metrics['skipped'] = 1.0 - finite.astype(jnp.float32)

  def keep(new, old):
    return jnp.where(finite, new, old)

  return new_state.replace(
    params=jax.tree_util.tree_map(keep, new_state.params, old_state.params),
    opt_state=jax.tree_util.tree_map(
      keep, new_state.opt_state, old_state.opt_state
    ),
  )


def non_finite_terms(metrics: Mapping[str, Any]) -> list[str]:
  """Names of the floating-point metrics that hold a NaN or an Inf."""
  return sorted(
    k
    for k, v in metrics.items()
    if np.issubdtype(np.asarray(v).dtype, np.floating)
    and not np.all(np.isfinite(v))
  )


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Raises FloatingPointError naming the step and the non-finite terms."""
  bad = non_finite_terms(metrics)
  if bad:
    values = [float(np.asarray(metrics[k])) for k in bad]
    raise FloatingPointError(
      f'Non-finite training metrics at step {step}: {bad} = {values}. No '
      'checkpoint was written for this step; lower the learning rate or '
      "check the data, or set config.nan_policy='skip' to skip such steps."
    )
