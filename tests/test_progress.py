"""progress.itstime (the one rule for periodic actions) and Progress."""

import math

import pytest

from vmoe_jsd import progress


def _steps(every, total, **kw):
  return [s for s in range(1, total + 1)
          if progress.itstime(s, every, total, **kw)]  # fmt: skip


def test_itstime_leaves_the_last_step_to_the_end_unless_asked():
  # Evaluations and checkpoints: periodic, never the last step (the end of
  # training acts on it).
  assert _steps(3, 10) == [3, 6, 9]
  assert _steps(5, 10) == [5]
  assert _steps(0, 10) == []
  # Progress lines: periodic, the last step and the first after a restart.
  assert _steps(4, 10, last=True, first=1) == [1, 4, 8, 10]
  assert _steps(4, 10, last=True, first=7) == [4, 7, 8, 10]
  assert _steps(0, 3, last=True) == [3]


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_leaves_out_compilation_and_pauses():
  clock = _Clock()
  p = progress.Progress(start_step=2, num_steps=10, batch_size=8, clock=clock)
  clock.now += 30.0  # Step 3, the first after the restart: compilation.
  p.step_done()
  rate, eta = p.measure(3)
  assert math.isnan(eta) and p.train_seconds == 0.0
  clock.now += 2.0  # Steps 4 and 5: 16 images in 2 s.
  p.step_done()
  p.step_done()
  rate, eta = p.measure(5)
  assert rate == pytest.approx(8.0)
  assert eta == pytest.approx((10 - 5) * 8 / 8.0)
  assert p.train_seconds == pytest.approx(2.0)
  clock.now += 50.0  # An evaluation: not training time.
  p.resume()
  clock.now += 1.0
  p.step_done()
  p.measure(6)
  assert p.train_seconds == pytest.approx(3.0)


def test_progress_line_shows_compiling_then_rate_and_eta():
  s = {'total_loss': 1.0, 'xent': 0.9, 'auxiliary_loss': 0.01,
       'train_accuracy': 0.5, 'learning_rate': 1e-3}  # fmt: skip
  assert progress.progress_line(1, 10, s, 0.0, float('nan')).endswith(
    '(compiling)'
  )
  line = progress.progress_line(5, 10, {**s, 'consistency': 0.2}, 99.6, 3725)
  assert line.startswith('[step 5/10]  loss 1.0000  xent 0.9000')
  assert 'cons 0.2000' in line and line.endswith('100 img/s  ETA 1:02:05')
