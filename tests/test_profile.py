"""config.profile: a jax.profiler trace of a window of steps (profiling.py).

The trace files appear where TensorBoard's profile plugin reads them
(workdir/plugins/profile/<run>/*.xplane.pb), marked with exactly the
window's steps; the losses and final parameters are those of a run without
the profiler; a resumed run skips a window that has passed.
"""

import glob
import gzip
import json
import os

import jax
import numpy as np
import pytest
import smoke_config

from vmoe_jsd import checkpoints, config_lib, profiling, train
from vmoe_jsd.config_errors import ConfigError
from vmoe_jsd.data import arrays


def _smoke(**overrides):
  config = smoke_config.get_config()
  return smoke_config.with_overrides(config, num_train_steps=6, **overrides)


def _traced_steps(workdir) -> list[list[int]]:
  """The 'train' step markers of each trace run under workdir."""
  runs = sorted(glob.glob(os.path.join(workdir, 'plugins/profile/*')))
  out = []
  for run in runs:
    assert glob.glob(os.path.join(run, '*.xplane.pb')), os.listdir(run)
    (trace,) = glob.glob(os.path.join(run, '*.trace.json.gz'))
    with gzip.open(trace) as f:
      events = json.load(f)['traceEvents']
    out.append(
      sorted(
        int(e['args']['step_num']) for e in events if e.get('name') == 'train'
      )
    )
  return out


def _final_params(workdir):
  return checkpoints.Checkpointer(workdir, every_steps=2)._manager.restore(6)[
    'state'
  ]['params']


def _recording_report(monkeypatch):
  rows = []
  real = train.report

  def report(*args, **kwargs):
    row = real(*args, **kwargs)
    rows.append({k: v for k, v in row.items() if k != 'images_per_second'})
    return row

  monkeypatch.setattr(train, 'report', report)
  return rows


@pytest.mark.slow
def test_trace_appears_and_changes_no_number(
  tmp_path, monkeypatch, capsys, reference
):
  """Steps 2-3 of 6 traced: the trace holds exactly their step markers,
  and every progress row (each loss term, lr, grad norm) and the final
  parameters equal those of the same run without the profiler."""
  rows_off = [
    {k: v for k, v in row.items() if k != 'images_per_second'}
    for row in reference.rows
  ]
  assert not os.path.exists(os.path.join(reference.workdir, 'plugins'))
  rows = _recording_report(monkeypatch)
  config = _smoke(
    **smoke_config.REFERENCE,
    **{
      'profile.first_step': 2,
      'profile.num_steps': 2,
    },
  )
  workdir = str(tmp_path / 'on')
  train.train_and_evaluate(config, workdir)
  assert 'Profile of steps 2-3 written under' in capsys.readouterr().out
  assert _traced_steps(workdir) == [[2, 3]]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6] and rows == rows_off
  jax.tree_util.tree_map(
    np.testing.assert_array_equal,
    _final_params(reference.workdir),
    _final_params(workdir),
  )


@pytest.mark.slow  # Two runs: 60 s under load (about 15 s of CPU).
def test_resumed_run_skips_a_window_that_has_passed(
  tmp_path, monkeypatch, capsys
):
  """Steps 2-3 traced, killed after the step-4 checkpoint, resumed: the
  resumed run says so and does not trace again; its step 5 repeats the
  killed run's numbers."""
  rows = _recording_report(monkeypatch)
  crashing = smoke_config.crash_before_step(6)
  monkeypatch.setattr(arrays.ArrayDataset, 'train_batches', crashing)
  config = _smoke(**{'profile.first_step': 2, 'profile.num_steps': 2})
  workdir = str(tmp_path / 'run')
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  assert _traced_steps(workdir) == [[2, 3]]
  capsys.readouterr()
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'at step 4.' in out
  assert 'ended before the restored step 4: not traced.' in out
  assert 'Profile of steps' not in out
  assert _traced_steps(workdir) == [[2, 3]]  # No second trace.
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 5, 6]
  assert rows[5] == rows[4]


class _FakeProfiler:
  """Records start_trace / stop_trace and the annotated steps."""

  def __init__(self, monkeypatch):
    self.calls = []
    outer = self

    class Annotation:
      def __init__(self, name, step_num):
        self.step = step_num

      def __enter__(self):
        outer.calls.append(('step', self.step))

      def __exit__(self, *exc):
        return False

    monkeypatch.setattr(jax.profiler, 'StepTraceAnnotation', Annotation)
    monkeypatch.setattr(
      jax.profiler, 'start_trace', lambda d: self.calls.append(('start', d))
    )
    monkeypatch.setattr(
      jax.profiler, 'stop_trace', lambda: self.calls.append(('stop',))
    )


def _run_window(spec, logdir, start_step, num_steps, stop_at=None):
  logs = []
  window = profiling.ProfileWindow(
    spec, logdir, start_step, num_steps, logs.append
  )
  for step in range(start_step + 1, num_steps + 1):
    window.before_step(step)
    window.after_step(step, np.zeros(1))
    if step == stop_at:
      break
  window.close()
  return logs


@pytest.mark.parametrize(
  'first, num, start, total, stop_at, expected',
  [
    # A fresh run: steps 3-5.
    (
      3,
      3,
      0,
      10,
      None,
      [('start', 'w'), ('step', 3), ('step', 4), ('step', 5), ('stop',)],
    ),
    # Resumed inside the window: only its remaining steps.
    (3, 3, 3, 10, None, [('start', 'w'), ('step', 4), ('step', 5), ('stop',)]),
    # Resumed after the window: nothing.
    (3, 3, 5, 10, None, []),
    # A window past the end of training stops at the last step.
    (9, 5, 0, 10, None, [('start', 'w'), ('step', 9), ('step', 10), ('stop',)]),
    # A stop signal inside the window: close() stops the trace.
    (3, 3, 0, 10, 4, [('start', 'w'), ('step', 3), ('step', 4), ('stop',)]),
    # Off.
    (3, 0, 0, 10, None, []),
  ],
)
def test_window_steps_by_hand(
  monkeypatch, first, num, start, total, stop_at, expected
):
  fake = _FakeProfiler(monkeypatch)
  spec = profiling.ProfileSpec(first_step=first, num_steps=num)
  logs = _run_window(spec, 'w', start, total, stop_at)
  assert fake.calls == expected
  if start >= first + num - 1 and num:
    assert logs == [
      f'Profile window (steps {first}-{first + num - 1}) ended before the '
      f'restored step {start}: not traced.'
    ]


def test_other_processes_do_not_trace(monkeypatch):
  fake = _FakeProfiler(monkeypatch)
  _run_window(profiling.ProfileSpec(1, 2), None, 0, 4)
  assert fake.calls == []


@pytest.mark.parametrize(
  'block, expected',
  [
    (
      {'first_step': 0, 'num_steps': 2},
      'config.profile.first_step=0 is invalid: must be an integer >= 1',
    ),
    ({'first_step': 2, 'num_steps': -1}, 'config.profile.num_steps=-1'),
    ({'first_step': 2.5, 'num_steps': 1}, 'config.profile.first_step=2.5'),
    (
      {'first_step': 7, 'num_steps': 1},
      'config.profile.first_step=7 is invalid: must be <= num_train_steps=6',
    ),
    ({'first_step': 2, 'num_steps': 1, 'every': 3}, "config.profile=['every']"),
  ],
)
def test_bad_profile_blocks_fail_at_resolution(block, expected):
  config = _smoke()
  with config.unlocked():
    config.profile = block
  with pytest.raises(ConfigError) as err:
    config_lib.resolve(config, 1)
  assert expected in str(err.value) and '\n' not in str(err.value)


def test_off_by_default_and_a_late_window_is_fine_when_off():
  config = _smoke(**{'profile.first_step': 100})
  assert config_lib.resolve(config, 1).profile == profiling.ProfileSpec(100, 0)
