"""Preemption (SIGTERM / Ctrl-C) and the non-finite-loss policy.

A SIGTERM (what TPU VM maintenance and SLURM preemption send) must finish
the current step, or the current batch of an evaluation, save a checkpoint
of the step, exit cleanly, and the resumed run must end as an uninterrupted
run does (parameters bitwise, evaluations equal). Two Ctrl-C must end the
process at once, also during a compilation, by the signal and without a
crash. A NaN under nan_policy='skip' must leave parameters and optimizer
state as they were and let training go on; under 'stop' it must stop
naming the step and terms.

No outcome here depends on timing: a signal is sent at a set step, batch
or compilation (signal_hooks.py) to the main thread, whose handler runs
before the sending call returns. Runs inside this pytest process listen to
a private signal (`_private_stop_signal`): a SIGTERM from outside the test
(a job runner, `kill`/`pkill` of a process group or by name) reaching the
pytest process during a run would otherwise be taken for the test's own;
that was the `{'preempted_at_step': 1} != {'preempted_at_step': 3}` failure
seen once under load (step 1 is the longest window: it compiles).
"""

import json
import os
import random
import signal
import sys
import threading

import commands
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import signal_hooks
import smoke_config

from vmoe_jsd import checkpoints, config_lib, resilience, train
from vmoe_jsd.data import arrays
from vmoe_jsd.evaluation import core

STOP = signal.SIGUSR1  # The in-process runs' private stop signal.


def _load_smoke(**overrides):
  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


# ----------------------------------------------------------------------------
# The signal path, in process.
# ----------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _sigint_as_python_sets_it():
  """SIGINT raising KeyboardInterrupt, as in a foreground Python process.

  A process started with SIGINT ignored (a background job of a
  non-interactive shell, nohup) keeps it ignored in Python, and the guard
  then leaves it so (test below); these tests are about the usual case.
  """
  before = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, before)


class _PrivateGuard(resilience.PreemptionGuard):
  def __init__(self):
    super().__init__(signals=(STOP,))


@pytest.fixture
def _private_stop_signal(monkeypatch):
  """train_and_evaluate's guard stops on STOP only (see the docstring).

  Outside the guard STOP is recorded, not fatal: a signal that reaches no
  guard (a handler installed too late) fails the test that sent it by its
  result, instead of ending the pytest process by SIGUSR1's default.
  """
  monkeypatch.setattr(resilience, 'PreemptionGuard', _PrivateGuard)
  unguarded = []
  original = signal.signal(STOP, lambda *_: unguarded.append(True))
  before = signal.getsignal(STOP)
  yield unguarded
  assert signal.getsignal(STOP) == before  # Put back after every run.
  signal.signal(STOP, original)


def test_an_ignored_sigint_stays_ignored_and_sigterm_still_stops():
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  guard = resilience.PreemptionGuard()
  ran = []
  for step in guard.steps(0, 10):
    ran.append(step)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if step == 2:
      _signal_main_thread(signal.SIGINT)  # Ignored: the loop goes on.
    if step == 4:
      _signal_main_thread(signal.SIGTERM)
  assert ran == [1, 2, 3, 4] and guard.signal_name == 'SIGTERM'
  assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def _signal_main_thread(sig):
  """Sends `sig` to this process's main thread, handled before returning.

  os.kill(getpid()) lets the kernel pick any thread (XLA's included); the
  handler then runs when that thread is next scheduled, which under load
  can be after the step the test expects it in. pthread_kill to the main
  thread from the main thread runs the handler before it returns.
  """
  signal.pthread_kill(threading.main_thread().ident, sig)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_current_step(sig):
  before = signal.getsignal(sig)
  guard = resilience.PreemptionGuard()
  ran, exits = [], []
  for step in guard.steps(0, 10, on_exit=lambda: exits.append(True)):
    ran.append(step)
    if step == 3:
      _signal_main_thread(sig)
  assert ran == [1, 2, 3]
  assert guard.stopped_at == 3
  assert guard.signal_name == signal.Signals(sig).name
  assert exits == [True]
  assert signal.getsignal(sig) is before


def test_second_sigint_interrupts_at_once():
  guard = resilience.PreemptionGuard()
  ran = []
  with pytest.raises(KeyboardInterrupt):
    for step in guard.steps(0, 10):
      ran.append(step)
      if step == 2:
        _signal_main_thread(signal.SIGINT)  # First: stop after this step.
        assert guard.should_stop(step)
        # Second: Python's handler (the one from before) raises at once.
        _signal_main_thread(signal.SIGINT)
        raise AssertionError('the second SIGINT did not interrupt')
  assert ran == [1, 2]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_signal_runs_every_step_and_body_errors_still_call_on_exit():
  guard = resilience.PreemptionGuard()
  assert list(guard.steps(4, 7)) == [5, 6, 7]
  assert guard.stopped_at is None
  exits = []
  with pytest.raises(RuntimeError, match='boom'):
    for step in guard.steps(0, 5, on_exit=lambda: exits.append(True)):
      if step == 2:
        raise RuntimeError('boom')
  assert exits == [True]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_watching_nests_and_stop_at_ends_the_steps():
  guard = resilience.PreemptionGuard(signals=(STOP,))
  before = signal.getsignal(STOP)
  ran = []
  with guard.watching():
    for step in guard.steps(0, 10):
      ran.append(step)
      if step == 2:
        guard.stop_at(step, 'its evaluation')
    assert signal.getsignal(STOP) == guard._handle  # Still the outer one's.
  assert signal.getsignal(STOP) is before
  assert ran == [1, 2] and guard.stopped_at == 2
  assert guard.stopped_during == 'its evaluation'
  # Before step 1 and after step 1; step 2 was stopped by stop_at.
  assert guard.num_checks == 2


def test_a_request_before_the_loop_stops_before_the_first_step():
  guard = resilience.PreemptionGuard(signals=(STOP,))
  with guard.watching():  # As train_and_evaluate watches from start-up.
    _signal_main_thread(STOP)
    assert list(guard.steps(4, 10)) == []
  assert guard.stopped_at == 4 and guard.stopped_during == 'the start-up'
  assert guard.signal_name == STOP.name


class _Batches:
  def __init__(self, n):
    self.n = n

  def eval_batches(self, *args, **kwargs):
    yield from range(self.n)


@pytest.mark.parametrize('stop_before', [None, 1, 2, 3])
def test_stoppable_split_asks_between_batches_only(stop_before):
  asked = []

  def should_stop():
    asked.append(len(asked) + 1)  # Asked before batch len(asked) + 1.
    return asked[-1] == stop_before

  split = core.StoppableSplit(_Batches(4), should_stop)
  got = list(split.eval_batches(16))
  if stop_before is None:  # Asked before batches 1, 2 and 3: not before 0
    assert got == [0, 1, 2, 3] and asked == [1, 2, 3]  # nor after 3.
    assert not split.stopped
  else:
    assert got == list(range(stop_before)) and split.stopped
    assert asked == list(range(1, stop_before + 1))
    assert list(split.eval_batches(16)) == []  # Stopped stays stopped,
    assert len(asked) == stop_before  # without asking again.


@pytest.mark.slow
def test_stop_in_start_up_or_training_then_resume_equals_uninterrupted(
  tmp_path, monkeypatch, capsys, reference, _private_stop_signal
):
  """A stop requested while the run starts (here as its state is made,
  before the loop compiles) is kept, not lost or fatal: the run stops
  before its first step (nothing to save from step 0; the restored step's
  checkpoint is the resume point later). A stop after step 3 saves step 3
  (no periodic checkpoint) and writes no results; stopped again as it
  restores step 3, it stops there; the resume finishes as a run that was
  never stopped (parameters bitwise)."""
  config = _load_smoke(**smoke_config.REFERENCE)
  workdir = str(tmp_path / 'run')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  with monkeypatch.context() as m:
    signal_hooks.at_setup(STOP.name, patch=m.setattr)
    result = train.train_and_evaluate(config, workdir)
  assert not _private_stop_signal  # The guard heard it, ...
  assert result == {'preempted_at_step': 0, 'signal': STOP.name}
  out = capsys.readouterr().out
  assert '[step ' not in out and 'nothing trained yet' in out
  assert not os.path.exists(ckpt_dir) or not os.listdir(ckpt_dir)

  with monkeypatch.context() as m:
    signal_hooks.at_step(3, STOP.name, patch=m.setattr)
    result = train.train_and_evaluate(config, workdir)
  assert result == {'preempted_at_step': 3, 'signal': STOP.name}
  out = capsys.readouterr().out
  assert f'Stopped by {STOP.name} after step 3:' in out
  assert '[step 3/6]' in out and '[step 4/6]' not in out
  assert os.listdir(ckpt_dir) == ['3']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  with monkeypatch.context() as m:  # Restored at step 3, stopped again.
    signal_hooks.at_setup(STOP.name, patch=m.setattr)
    result = train.train_and_evaluate(config, workdir)
  assert result == {'preempted_at_step': 3, 'signal': STOP.name}
  out = capsys.readouterr().out
  assert 'at step 3.' in out and '[step 4/6]' not in out
  assert os.listdir(ckpt_dir) == ['3']

  result = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'at step 3.' in out and '[step 4/6]' in out
  assert result['step'] == 6
  assert sorted(os.listdir(ckpt_dir)) == ['4', '6']
  assert result['accuracy'] == reference.result['accuracy']
  jax.tree_util.tree_map(
    np.testing.assert_array_equal,
    _final_params(reference.workdir, 6),
    _final_params(workdir, 6),
  )


def _recorded_evaluations(monkeypatch):
  """{step: figures} of every finished test evaluation (time left out)."""
  records = {}
  original = train.Evaluations.test

  def test(self, params, step, *args, **kwargs):
    result = original(self, params, step, *args, **kwargs)
    if result is not None:
      records[step] = {k: v for k, v in result.items() if k != 'eval_seconds'}
    return result

  monkeypatch.setattr(train.Evaluations, 'test', test)
  return records


@pytest.mark.slow
def test_stop_during_evaluations_then_resume_equals_uninterrupted(
  tmp_path, monkeypatch, capsys, reference, _private_stop_signal
):
  """A stop request in the periodic evaluation of step 2 and in the final
  one (each after its first of two batches) saves that step; the resumed
  runs evaluate it again and end as a run that was never stopped."""
  config = _load_smoke(**smoke_config.REFERENCE)
  want = reference.evaluations
  assert sorted(want) == [2, 4, 6]
  records = _recorded_evaluations(monkeypatch)

  workdir = str(tmp_path / 'run')
  note = os.path.join(workdir, train.INTERRUPTED_EVALUATION)
  reads = []
  with monkeypatch.context() as m:
    signal_hooks.in_eval(2, 0, STOP.name, patch=m.setattr, reads=reads)
    result = train.train_and_evaluate(config, workdir)
  assert result == {'preempted_at_step': 2, 'signal': STOP.name}
  out = capsys.readouterr().out
  assert reads == [(2, 0)]  # Its second batch was never read.
  assert not records and '[eval step 2]' not in out
  assert (
    f'Stopped by {STOP.name} after step 2 (during its evaluation, '
    'which a resume runs again)'
  ) in out
  assert '[step 3/6]' not in out
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
  assert os.path.exists(note)

  with monkeypatch.context() as m:
    signal_hooks.in_eval(6, 0, STOP.name, patch=m.setattr)
    result = train.train_and_evaluate(config, workdir)
  assert result == {'preempted_at_step': 6, 'signal': STOP.name}
  out = capsys.readouterr().out
  assert 'The evaluation of step 2 was interrupted; evaluating again.' in out
  assert out.index('[eval step 2]') < out.index('[step 3/6]')
  assert records == {2: want[2], 4: want[4]} and not os.path.exists(note)
  assert 'during the final evaluation' in out
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '6']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  result = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert '[step ' not in out and records == want
  for key in ('accuracy', 'num_examples', 'routing', 'step'):
    assert result[key] == reference.result[key], key
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['routing'] == reference.result['routing']


_FEWSHOT_DATA = dict(
  name='synthetic', batch_size=16, image_size=16, num_classes=4
)
_EXTRA_EVALUATIONS = {
  'robustness': {
    'evaluate.robustness.enabled': True,
    'evaluate.robustness.suites': ('cheap',),
    'evaluate.robustness.capacity_factors': (1.0,),
  },
  'fewshot': {
    'fewshot.datasets': {
      'syn': {
        'train': dict(_FEWSHOT_DATA, split='train', num_examples=48),
        'test': dict(_FEWSHOT_DATA, split='test', num_examples=32),
      }
    },
    'fewshot.shots': (1, 5),
    'fewshot.seeds': (0, 1),
    'fewshot.l2_reg': 8.0,
  },
}


@pytest.mark.slow
@pytest.mark.parametrize('extra', sorted(_EXTRA_EVALUATIONS))
def test_stop_inside_robustness_or_fewshot_then_resume_equals_uninterrupted(
  tmp_path, monkeypatch, capsys, trained, _private_stop_signal, extra
):
  """A stop request inside the robustness suites or few-shot (after
  their first batch) abandons the final evaluation between batches: its
  step is saved, nothing is written, and the resume's results equal an
  uninterrupted run's."""
  overrides = {
    'save_checkpoint.every_steps': 0,
    'num_train_steps': 2,
    **_EXTRA_EVALUATIONS[extra],
  }
  full = trained(**overrides).result  # As test_robustness_in_training's.
  config = _load_smoke(**overrides)
  original, sent = core.RaisingSplit.eval_batches, []

  def batches(self, *args, **kwargs):
    for batch in original(self, *args, **kwargs):
      yield batch
      if not sent:  # Asked before the next batch: the stop is seen there.
        sent.append(True)
        signal_hooks._to_main(STOP.name)

  workdir = str(tmp_path / 'run')
  with monkeypatch.context() as m:
    m.setattr(core.RaisingSplit, 'eval_batches', batches)
    result = train.train_and_evaluate(config, workdir)
  assert sent and result == {'preempted_at_step': 2, 'signal': STOP.name}
  assert 'during the final evaluation' in capsys.readouterr().out
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  result = train.train_and_evaluate(config, workdir)
  assert result['accuracy'] == full['accuracy']
  if extra == 'fewshot':
    assert result['fewshot'] == full['fewshot']
  else:
    got, want = (r['robustness']['cheap']['rows'] for r in (result, full))
    assert [r['accuracy'] for r in got] == [r['accuracy'] for r in want]


def test_raising_split_raises_between_batches_only():
  asked = []

  def should_stop():
    asked.append(True)
    return len(asked) == 2  # Before the third batch.

  split = core.RaisingSplit(_Batches(4), should_stop)
  got = []
  with pytest.raises(core.EvaluationStopped):
    got.extend(split.eval_batches(16))
  assert got == [0, 1] and split.stopped
  assert list(core.RaisingSplit(_Batches(1), should_stop).eval_batches(16)) == [
    0
  ]  # One batch: never asked.


# ----------------------------------------------------------------------------
# Real signals to a training process (main), at set points.
# ----------------------------------------------------------------------------
def _main(workdir, *flags, hook=None, cache=True):
  """main on one CPU device (a user's default run), or signal_hooks.py
  running it with `hook`; cache=False: every function really compiles."""
  command = commands.module('vmoe_jsd.main')
  env = {}
  if hook:
    command, env = [sys.executable, commands.HOOKS], {'SIGNAL_HOOK': hook}
  return commands.start(
    [
      *command,
      f'--config={commands.SMOKE}',
      f'--workdir={workdir}',
      '--config.num_train_steps=150',
      '--config.save_checkpoint.every_steps=0',
      '--config.report_progress.every_steps=1',
      *flags,
    ],
    cache=cache,
    **env,
  )


def _assert_ended_by_sigint(returncode, output):
  """Killed by SIGINT itself (a shell reports status 130), no crash."""
  assert 'hook: SIGINT 1 during compilation' in output, output
  assert returncode == -signal.SIGINT, output
  for crash in ('Traceback', 'Segmentation fault', 'Fatal Python error'):
    assert crash not in output, output
  assert 'Interrupted (SIGINT): exiting now' in output


@pytest.mark.parametrize(
  'function',
  [
    # The first long compilation, before training.
    pytest.param('init_state', marks=pytest.mark.processes),
    pytest.param('train_step', marks=pytest.mark.slow),  # Guarded.
  ],
)
def test_double_ctrl_c_during_compilation_exits_by_sigint(tmp_path, function):
  """No traceback and no segfault: before the fix, the second SIGINT's
  KeyboardInterrupt left jaxlib's compile call while XLA compiled on, and
  the interpreter shut down under it (SIGSEGV, 4 of 4 in the probe)."""
  workdir = str(tmp_path / 'run')
  proc = _main(workdir, hook=f'compile:{function}', cache=False)
  output = proc.communicate(timeout=900)[0]
  _assert_ended_by_sigint(proc.returncode, output)
  if function == 'train_step':  # The first asked for a stop; the second
    assert 'Received SIGINT' in output  # ended it at once.
    assert 'hook: SIGINT 2 during compilation' in output
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '1'))


def test_double_ctrl_c_during_compilation_of_another_command():
  """The commands besides main that compile (eval_main, analyze,
  inspect_step) end by SIGINT too; inspect_step compiles the train step
  without any checkpoint or data, so it stands for them here (and is the
  default run's real process of inspect_step)."""
  proc = commands.run(
    [
      sys.executable,
      commands.HOOKS,
      f'--config={commands.SMOKE}',
      '--num_devices=2',
    ],
    cache=False,
    SIGNAL_HOOK='compile:train_step',
    SIGNAL_HOOK_MODULE='vmoe_jsd.inspect_step',
    timeout=900,
  )
  _assert_ended_by_sigint(proc.returncode, proc.stdout + proc.stderr)


def _final_params(workdir, step):
  ckpt = checkpoints.Checkpointer(workdir, every_steps=0)
  params = ckpt._manager.restore(step)['state']['params']
  ckpt.close()
  return params


@pytest.mark.slow
def test_sigterm_subprocess_resumes_bitwise_equal(tmp_path):
  """SIGTERM at a random step of a training process: a checkpoint of that
  step, exit status 0, and a resumed run whose final parameters are
  bitwise those of an uninterrupted run."""
  seed = random.randrange(1 << 30)
  step = random.Random(seed).randrange(1, 150)
  full = _main(str(tmp_path / 'full'))

  workdir = str(tmp_path / 'preempted')
  proc = _main(workdir, hook=f'step:{step}:SIGTERM')
  output = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, f'seed {seed}\n{output}'
  assert f'Stopped by SIGTERM after step {step}:' in output, output
  # The step it was in was finished and saved; no later step ran.
  assert f'[step {step}/150]' in output
  assert f'[step {step + 1}/150]' not in output
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(step)]

  resumed = _main(workdir)
  output = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, output
  assert f'at step {step}.' in output and f'[step {step + 1}/150]' in output
  assert full.communicate(timeout=600)[1] is None and full.returncode == 0

  jax.tree_util.tree_map(
    np.testing.assert_array_equal,
    _final_params(str(tmp_path / 'full'), 150),
    _final_params(workdir, 150),
  )


# ----------------------------------------------------------------------------
# nan_policy.
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: dict


@pytest.mark.parametrize(
  'loss, grad_norm, applied',
  [(1.0, 2.0, True), (np.nan, 2.0, False), (1.0, np.inf, False)],
)
def test_skip_policy_keeps_parameters_of_non_finite_steps(
  loss, grad_norm, applied
):
  old = _State(jnp.int32(4), {'w': jnp.ones(3)}, {'mu': jnp.zeros(3)})
  new = _State(jnp.int32(5), {'w': jnp.full(3, 7.0)}, {'mu': jnp.full(3, 9.0)})

  @jax.jit
  def step(loss, grad_norm):
    metrics = {'total_loss': loss, 'grad_norm': grad_norm}
    out = resilience.apply_nan_policy('skip', old, new, metrics)
    return out, metrics['skipped']

  out, skipped = step(jnp.float32(loss), jnp.float32(grad_norm))
  want = new if applied else old
  np.testing.assert_array_equal(out.params['w'], want.params['w'])
  np.testing.assert_array_equal(out.opt_state['mu'], want.opt_state['mu'])
  assert int(out.step) == 5  # Counted either way.
  assert float(skipped) == (0.0 if applied else 1.0)
  # 'stop' leaves the step as it is.
  metrics = {'total_loss': jnp.float32(loss), 'grad_norm': grad_norm}
  assert resilience.apply_nan_policy('stop', old, new, metrics) is new
  assert 'skipped' not in metrics


def _poison_step_3(monkeypatch):
  original = arrays.ArrayDataset.train_batches

  def poisoned(self, *args, **kwargs):
    start = kwargs.get('start_step', 0)
    for i, batch in enumerate(original(self, *args, **kwargs)):
      # Float images (the pipeline's are uint8, which holds no NaN).
      image = batch['image'].astype(np.float32)
      if start + i + 1 == 3:
        image = np.full_like(image, np.nan)
      yield dict(batch, image=image)

  monkeypatch.setattr(arrays.ArrayDataset, 'train_batches', poisoned)


@pytest.mark.slow
def test_nan_skip_policy_trains_on_past_a_nan_step(tmp_path, monkeypatch):
  _poison_step_3(monkeypatch)
  config = _load_smoke(
    **{
      'nan_policy': 'skip',
      'num_train_steps': 4,
      'save_checkpoint.every_steps': 1,
      'save_checkpoint.keep_last': 10,
    }
  )
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 4 and np.isfinite(result['accuracy'])
  with open(os.path.join(workdir, 'train_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  by_step = {h['step']: h for h in history}
  # The NaN loss is written as null (strict JSON).
  assert by_step[3]['skipped'] == 1.0 and by_step[3]['xent'] is None
  assert [by_step[s]['skipped'] for s in (1, 2, 4)] == [0.0] * 3
  assert by_step[2]['skipped_steps'] == 0.0
  assert by_step[4]['skipped_steps'] == 1.0
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1)
  s2, s3, s4 = (ckpt._manager.restore(s)['state'] for s in (2, 3, 4))
  ckpt.close()
  # Step 3 changed nothing but the step counter; step 4 trained again.
  assert int(s3['step']) == 3
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, s2['params'], s3['params']
  )
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, s2['opt_state'], s3['opt_state']
  )
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(
      jax.tree_util.tree_leaves(s3['params']),
      jax.tree_util.tree_leaves(s4['params']),
      strict=True,
    )
  )
  assert all(
    np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(s4['params'])
  )


def test_nan_stop_policy_names_step_and_terms(tmp_path, monkeypatch):
  _poison_step_3(monkeypatch)
  config = _load_smoke(**{'save_checkpoint.every_steps': 0})
  with pytest.raises(FloatingPointError) as info:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  text = str(info.value)
  assert 'at step 3' in text
  assert "'total_loss'" in text and "'xent'" in text
  assert "nan_policy='skip'" in text


def test_bad_nan_policy_fails_validation():
  config = _load_smoke(nan_policy='ignore')
  with pytest.raises(ValueError, match=r"nan_policy='ignore'.*'skip', 'stop'"):
    config_lib.validate(config, 1)
