"""A jax.profiler trace of a window of train steps (config.profile).

As big_vision's and vmoe's trainers: `jax.profiler.start_trace(workdir)`
before the first step of the window and `stop_trace()` after its last, so
the trace lands in workdir/plugins/profile/<time>/<host>.xplane.pb, where
`tensorboard --logdir WORKDIR` (with the tensorboard-plugin-profile
package) shows it under Profile. Each step of the window is marked with a
`jax.profiler.StepTraceAnnotation('train', step_num=step)` for the plugin's
step-time view. Main process only. Tracing reads timings; it changes no
computation (tests/test_profile.py checks the losses are identical).

Steps are the numbers of the progress lines (1-based: step s leaves the
state at s). A resumed run traces only the steps of the window it runs: a
window that ended before the restored step is skipped (with a log line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax

from vmoe_jsd.config_errors import check_keys, check_range, reject, to_dict

KEYS = ('first_step', 'num_steps')


@dataclasses.dataclass(frozen=True)
class ProfileSpec:
  """config.profile: `num_steps` steps traced (0: off) from `first_step`
  (default 10: after compilation and the first steps' warm-up)."""

  first_step: int = 10
  num_steps: int = 0

  @classmethod
  def from_config(
    cls, cfg: Mapping | None, num_train_steps: int | None = None
  ) -> ProfileSpec:
    """Checks config.profile (against num_train_steps when it is known)."""
    cfg = to_dict(cfg)
    check_keys('profile', cfg, KEYS)
    spec = cls(**cfg)
    check_range('profile.first_step', spec.first_step, 1, integer=True)
    check_range('profile.num_steps', spec.num_steps, 0, integer=True)
    if spec.num_steps and num_train_steps and spec.first_step > num_train_steps:
      reject(
        'profile.first_step',
        spec.first_step,
        f'must be <= num_train_steps={num_train_steps}, or set '
        'profile.num_steps=0',
      )
    return spec

  @property
  def last_step(self) -> int:
    return self.first_step + self.num_steps - 1


class ProfileWindow:
  """Starts and stops the trace around the window's steps.

  In the loop: `before_step(step)` before the step's input is read,
  `after_step(step, outputs)` after the step is dispatched, and `close()`
  after the loop (stops a trace cut short by a stop signal).
  """

  def __init__(
    self,
    spec: ProfileSpec,
    logdir: str | None,
    start_step: int,
    num_steps: int,
    log: Callable[[str], None],
  ):
    """The window of `spec` within the steps start_step + 1 ... num_steps of
    this run; `logdir` is the trace's root, the workdir (None: no trace, e.g.
    on a process other than the main one)."""
    self.logdir, self._log = logdir, log
    self.first = max(spec.first_step, start_step + 1)
    self.last = min(spec.last_step, num_steps)
    self.enabled = bool(spec.num_steps and logdir and self.first <= self.last)
    self.tracing, self._annotation = False, None
    if spec.num_steps and logdir and spec.last_step <= start_step:
      log(
        f'Profile window (steps {spec.first_step}-{spec.last_step}) ended '
        f'before the restored step {start_step}: not traced.'
      )

  def before_step(self, step: int) -> None:
    if not self.enabled or not self.first <= step <= self.last:
      return
    if step == self.first:
      jax.profiler.start_trace(self.logdir)
      self.tracing = True
    self._annotation = jax.profiler.StepTraceAnnotation('train', step_num=step)
    self._annotation.__enter__()

  def after_step(self, step: int, outputs) -> None:
    if self._end_annotation() and step == self.last:
      jax.block_until_ready(outputs)  # The device work of the last step.
      self._stop(step)

  def close(self) -> None:
    """Stops a trace the loop left running (stopped inside the window)."""
    self._end_annotation()
    if self.tracing:
      self._stop(None)

  def _end_annotation(self) -> bool:
    """Ends the step's annotation; whether there was one."""
    if self._annotation is None:
      return False
    self._annotation.__exit__(None, None, None)
    self._annotation = None
    return True

  def _stop(self, step: int | None) -> None:
    jax.profiler.stop_trace()
    self.tracing = False
    until = f'{step}' if step is not None else 'the stop'
    where = f'{self.logdir}/plugins/profile'
    self._log(
      f'Profile of steps {self.first}-{until} written under {where} '
      '(TensorBoard: Profile).'
    )
