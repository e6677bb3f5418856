"""Preemption and non-finite losses: what a long run does when things fail.

What a user sees: docs/checkpoints_and_storage.md (Preemption, Non-finite
loss). `apply_nan_policy` is config.nan_policy 'skip' inside the jitted step
(no host sync), `check_finite` its 'stop' on the host.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed  # Its client, as multihost_utils reads it.

NAN_POLICIES = ('stop', 'skip')


class PreemptionGuard:
  """Turns SIGTERM (and a first SIGINT) into a stop at a step boundary.

  The train loop iterates `for step in guard.steps(start, end):`; the
  signal handlers are installed while it runs (and inside `watching()`,
  e.g. around an evaluation). After the body of a step the guard asks
  whether to stop; if so the loop ends and `stopped_at` holds that step,
  whose checkpoint the caller then saves. An evaluation asks
  `should_stop()` between its batches.

  On several processes every answer is agreed (see `_agree`): a signal to
  any one process stops all of them after the same step or batch. Every
  process must then ask at the same points, as they do when they run the
  same loop.

  `signals` request a stop (tests use a private one). `signal_name` is the
  signal received ('' when none), `stopped_at` the last step run before a
  requested stop (else None), `stopped_during` what the stop abandoned (''
  between steps, see stop_at), `num_checks` how often should_stop was asked.
  """

  # The keys of check n must not repeat within a jax.distributed session,
  # which may outlive one guard (several runs in one process): one count
  # per process (every process runs the same checks).
  _check_ids = itertools.count()
  _KEY = 'vmoe_jsd/stop'
  # A barrier waits for the slowest process, e.g. through a compilation of
  # the evaluation step, which can differ by minutes between processes.
  BARRIER_TIMEOUT_MS = 2 * 3600 * 1000

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.signal_name = ''
    self.stopped_at: int | None = None
    self.stopped_during = ''
    self.num_checks = 0
    self._requested = threading.Event()
    self._previous: dict[int, Any] = {}
    self._depth = 0
    # Several processes without jax.distributed share no coordination
    # service: each then answers for itself.
    self._multi = (
      jax.process_count() > 1 and distributed.global_state.client is not None
    )

  def steps(
    self,
    start_step: int,
    num_steps: int,
    on_exit: Callable[[], None] | None = None,
  ) -> Iterator[int]:
    """Yields start_step + 1 ... num_steps until a stop is requested.

    None when a stop was requested before the first (stopped_at is then
    start_step, the step the state is at). `on_exit` is called when the loop
    ends, also by an exception in its body (the generator is closed then):
    e.g. wait for pending saves.
    """
    try:
      with self.watching():
        # A request that came before the loop (during restore or the first
        # compilations, when the caller watched from the start): stop
        # before the first step; on several processes all agree on it.
        if start_step < num_steps and self.should_stop(start_step):
          self.stopped_at, self.stopped_during = start_step, 'the start-up'
          return
        for step in range(start_step + 1, num_steps + 1):
          yield step
          if self.stopped_at is not None:  # stop_at() in the body.
            return
          if step < num_steps and self.should_stop(step):
            self.stopped_at = step
            return
    finally:
      if on_exit is not None:
        on_exit()

  @contextlib.contextmanager
  def watching(self) -> Iterator[PreemptionGuard]:
    """The signal handlers, installed for the `with` block (nestable; main
    thread only); the previous ones (SIG_DFL for a C++ one) put back."""
    self._depth += 1
    if (
      self._depth == 1 and threading.main_thread() is threading.current_thread()
    ):
      self._install()  # Python only delivers signals to the main thread.
    try:
      yield self
    finally:
      self._depth = max(self._depth - 1, 0)
      if not self._depth:
        for sig, handler in self._previous.items():
          signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

  def _install(self) -> None:
    for sig in self.signals:
      if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
        # Started with SIGINT ignored (nohup, a background job of a
        # non-interactive shell): whoever started us chose that; keep it.
        continue
      # On several processes this replaces JAX's preemption notifier (a C++
      # handler, which Python reports as None); it only served
      # reached_preemption_sync_point, which the guard no longer asks.
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      # The next Ctrl-C goes to the handler from before: KeyboardInterrupt
      # in Python's default, an exit at once under `exit_on_interrupt`.
      previous = self._previous.get(signum, signal.default_int_handler)
      signal.signal(
        signal.SIGINT, signal.SIG_DFL if previous is None else previous
      )
    if self._requested.is_set():
      return  # A second SIGTERM: the stop is already on its way.
    self.signal_name = name
    self._requested.set()
    print(
      f'Received {name}: finishing this step (or evaluation batch), then '
      'saving a checkpoint and exiting.',
      file=sys.stderr,
      flush=True,
    )

  def stop_at(self, step: int, during: str = '') -> None:
    """Records a stop that the caller decided (should_stop said True inside
    an evaluation): steps() then ends after the body of `step`, whose state
    is to be saved; `during` says what was abandoned (e.g. 'its evaluation').
    """
    self.stopped_at, self.stopped_during = step, during

  def should_stop(self, step: int | None = None) -> bool:
    """Whether to stop now; the same answer on every process (`step`, the
    step just finished or None between evaluation batches, changes none)."""
    del step
    self.num_checks += 1
    if not self._multi:
      return self._requested.is_set()
    name = self._agree()
    if name:
      self.signal_name = name
    return bool(name)

  def _agree(self) -> str:
    """The signal name requested on any process ('' if none), on all.

    Check n: a process whose stop was requested writes `stop/<n>/<process>`
    in the coordination service's key-value store; then every process
    passes the barrier (round n) and reads directory `stop/<n>/`. A key of
    check n is only written before its writer reaches round n, so all
    processes read the same directory. Two host RPCs per check and no
    device work: the host does not wait for the step it dispatched. The
    barrier's id is reused (the service counts rounds): one id per check
    would keep ~1 KB per check in process 0 (benchmarks/stop_agreement.py).
    """
    client = distributed.global_state.client
    key = f'{self._KEY}/{next(self._check_ids)}'
    if self._requested.is_set():
      client.key_value_set(
        f'{key}/{jax.process_index():06d}', self.signal_name or 'request'
      )
    client.wait_at_barrier(self._KEY, self.BARRIER_TIMEOUT_MS)
    requests = sorted(client.key_value_dir_get(f'{key}/'))
    return requests[0][1] if requests else ''


def exit_on_interrupt() -> None:
  """Makes Ctrl-C (SIGINT) end the process at once, for command lines.

  Python's KeyboardInterrupt is unsafe in a JAX program: raised while the
  main thread waits for XLA (jaxlib checks for signals while it compiles),
  it unwinds to interpreter shutdown while the compilation goes on in
  XLA's threads, and the process segfaults when that finishes; raised in a
  gc callback (jax registers one) it is printed and ignored, so the run
  goes on. Here SIGINT instead prints one line and ends the process by the
  signal itself (exit status 130 in a shell), skipping shutdown: the last
  checkpoint stays as it was (a save in flight is left unfinished, which a
  resume detects and skips), and the kernel releases the workdir lock.
  During training a first SIGINT still stops after the step with a
  checkpoint (PreemptionGuard); the second one comes here.
  An ignored SIGINT (nohup, a background job) stays ignored.
  """
  if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
    signal.signal(signal.SIGINT, _die_of_signal)


def _die_of_signal(signum, frame) -> None:
  del frame
  name = signal.Signals(signum).name
  print(
    f'Interrupted ({name}): exiting now; the last finished checkpoint is kept.',
    file=sys.stderr,
    flush=True,
  )
  sys.stdout.flush()
  signal.signal(signum, signal.SIG_DFL)
  signal.raise_signal(signum)


def apply_nan_policy(
  policy: str, old_state, new_state, metrics: dict[str, jax.Array]
):
  """Under 'skip', keeps `old_state`'s parameters if the step is not finite.

  Traced inside the train step. The step is finite when the total loss and
  the global gradient norm (`metrics['total_loss']`, `metrics['grad_norm']`)
  are finite and so is every floating-point array of the updated params
  and opt_state: a finite loss can still take an update past float32's
  range (a learning rate too large for the weights). Otherwise params and
  opt_state come from `old_state` (the step counter still advances) and
  `metrics['skipped']` is 1. The check of the new state is one reduction
  per array, fused by XLA into the update. Returns the state to continue
  from.
  """
  if policy == 'stop':
    return new_state
  finite = (
    jnp.isfinite(metrics['total_loss'])
    & jnp.isfinite(metrics['grad_norm'])
    & all_finite((new_state.params, new_state.opt_state))
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


def all_finite(tree) -> jax.Array:
  """A scalar bool: no floating-point array of `tree` holds NaN or Inf."""
  flags = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree_util.tree_leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


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
