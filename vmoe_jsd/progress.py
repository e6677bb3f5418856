"""When periodic actions happen, and the progress line with its ETA.

`itstime` is the one rule for every periodic action of the trainer
(report, evaluate, few-shot, checkpoint), after big_vision's
`utils.itstime`; `Progress` measures images/s and the training time
without the time spent compiling, evaluating or saving.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping


def itstime(step: int, every: int, total: int, *, last=False, first=None):
  """Whether a periodic action falls on `step` (1-based, the step just
  finished): every `every` steps (0: never periodically) and at `first` (e.g.
  the first after a (re)start). At `total`, the last step, only if `last`:
  otherwise it is left to the end of training, which acts on it anyway."""
  if step == total:
    return last
  return (bool(every) and step % every == 0) or step == first


class Progress:
  """Images/s, ETA and training time that leave out pauses.

  The first step after a (re)start is mostly compilation: it counts in
  neither the training time nor the rate. `resume()` after an evaluation or
  a save starts the next measurement from then.
  """

  def __init__(
    self, start_step: int, num_steps: int, batch_size: int, clock=time.time
  ):
    self.start_step, self.num_steps = start_step, num_steps
    self.batch_size, self.train_seconds = batch_size, 0.0
    self._clock = clock
    self._last = clock()
    self._steps = 0

  def step_done(self) -> None:
    self._steps += 1

  def resume(self) -> None:
    """Restart the measurement (after a pause: evaluation, checkpoint)."""
    self._last = self._clock()
    self._steps = 0

  def measure(self, step: int) -> tuple[float, float]:
    """(images/s, ETA in seconds) since the last measurement; ETA is NaN
    on the first step after a (re)start (its time is compilation)."""
    now = self._clock()
    dt = now - self._last
    compiling = step == self.start_step + 1
    if not compiling:
      self.train_seconds += dt
    self._last = now
    rate = self._steps * self.batch_size / max(dt, 1e-9)
    self._steps = 0
    if compiling:
      return rate, float('nan')
    return rate, (self.num_steps - step) * self.batch_size / max(rate, 1e-9)


def progress_line(step: int, num_steps: int, s: Mapping, img_per_s, eta) -> str:
  """`[step 50/2300]  loss ...  acc ...  lr ...  978 img/s  ETA 0:04:54`."""
  parts = [
    f'[step {step}/{num_steps}]',
    f'loss {s["total_loss"]:.4f}',
    f'xent {s["xent"]:.4f}',
    f'aux {s["auxiliary_loss"]:.4f}',
  ]
  if 'consistency' in s:
    parts.append(f'cons {s["consistency"]:.4f}')
  if s.get('skipped_steps'):
    parts.append(f'skipped {int(s["skipped_steps"])}')
  parts += [f'acc {s["train_accuracy"]:.3f}', f'lr {s["learning_rate"]:.2e}']
  if math.isfinite(eta):
    parts += [f'{img_per_s:.0f} img/s', f'ETA {hms(eta)}']
  else:
    parts.append('(compiling)')
  return '  '.join(parts)


def hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
