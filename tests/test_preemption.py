"""Preemption (SIGTERM / Ctrl-C) and the non-finite-loss policy.

A SIGTERM (what TPU VM maintenance and SLURM preemption send) must finish
the current step, save a checkpoint of it, exit cleanly, and the resumed run
must end with parameters bitwise equal to an uninterrupted run. A NaN under
nan_policy='skip' must leave parameters and optimizer state as they were and
let training go on; under 'stop' it must stop naming the step and terms.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config

from vmoe_jsd import checkpoints, config_lib, resilience, train
from vmoe_jsd.data import arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'tests', 'smoke_config.py')


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
  can be after the step the test expects it in.
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
        os.kill(os.getpid(), signal.SIGINT)  # First: stop after this step.
        # Python runs handlers in the main thread; two signals that arrive
        # before it does coalesce into one (XLA's threads can take the
        # delivery). A person's second Ctrl-C comes after the first was
        # handled: wait for that, as a person would (polling: a blocking
        # wait in the main thread would not run the handler when another
        # thread took the signal).
        deadline = time.monotonic() + 10
        while not guard._requested.is_set() and time.monotonic() < deadline:
          time.sleep(0.005)
        assert guard._requested.is_set()
        os.kill(os.getpid(), signal.SIGINT)  # Second: interrupt now.
        # The kernel may hand it to a thread that runs only later; Python
        # raises KeyboardInterrupt in the main thread once that thread has
        # run its C handler. Give it that time (it leaves this loop by
        # raising; a handler that never comes leaves the test failing).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
          time.sleep(0.005)
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


def test_sigterm_in_training_saves_that_step_and_resume_finishes(
  tmp_path, monkeypatch, capsys
):
  config = _load_smoke(**{'save_checkpoint.every_steps': 0})
  original = train._progress_line

  def sigterm_at_step_3(step, *args):
    # Progress lines are printed in the main thread, after each step here.
    if step == 3:
      _signal_main_thread(signal.SIGTERM)
    return original(step, *args)

  monkeypatch.setattr(train, '_progress_line', sigterm_at_step_3)
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  assert result == {'preempted_at_step': 3, 'signal': 'SIGTERM'}
  out = capsys.readouterr().out
  assert 'Stopped by SIGTERM after step 3' in out
  assert '[step 3/6]' in out and '[step 4/6]' not in out
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['3']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  result = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'at step 3.' in out and '[step 4/6]' in out
  assert result['step'] == 6
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']


# ----------------------------------------------------------------------------
# The acceptance test: a real SIGTERM to a training process.
# ----------------------------------------------------------------------------
def _main(workdir, *flags):
  env = dict(os.environ)
  env['XLA_FLAGS'] = ''  # One CPU device, as a user's default run.
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return subprocess.Popen(
    [sys.executable, '-m', 'vmoe_jsd.main', f'--config={SMOKE}',
     f'--workdir={workdir}', '--config.num_train_steps=150',
     '--config.save_checkpoint.every_steps=0',
     '--config.report_progress.every_steps=1', *flags],
    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    text=True,
  )  # fmt: skip


def _final_params(workdir, step):
  ckpt = checkpoints.Checkpointer(workdir, every_steps=0)
  params = ckpt._manager.restore(step)['state']['params']
  ckpt.close()
  return params


@pytest.mark.slow
def test_sigterm_subprocess_resumes_bitwise_equal(tmp_path):
  """SIGTERM at a random moment after the first progress line: a checkpoint
  at the step it was in, exit status 0, and a resumed run whose final
  parameters are bitwise those of an uninterrupted run."""
  seed = random.randrange(1 << 30)
  delay = random.Random(seed).uniform(0.0, 1.0)
  full = _main(str(tmp_path / 'full'))

  workdir = str(tmp_path / 'preempted')
  proc = _main(workdir)
  lines = []
  first_progress = threading.Event()

  def read():
    for line in proc.stdout:
      lines.append(line)
      if line.startswith('[step '):
        first_progress.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  assert first_progress.wait(timeout=300), ''.join(lines)
  time.sleep(delay)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  reader.join(timeout=60)
  output = ''.join(lines)
  assert proc.returncode == 0, f'seed {seed}\n{output}'
  stopped = [ln for ln in lines if ln.startswith('Stopped by SIGTERM')]
  assert stopped, f'seed {seed}: the run ended before the signal\n{output}'
  step = int(stopped[0].split('after step ')[1].split(':')[0])
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
  assert by_step[3]['skipped'] == 1.0 and not np.isfinite(by_step[3]['xent'])
  assert [by_step[s]['skipped'] for s in (1, 2, 4)] == [0.0] * 3
  assert by_step[2]['skipped_steps'] == 0.0
  assert by_step[4]['skipped_steps'] == 1.0
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1)
  s2, s3, s4 = (ckpt._manager.restore(s)['state'] for s in (2, 3, 4))
  ckpt.close()
  # Step 3 changed nothing but the step counter; step 4 trained again.
  assert int(s3['step']) == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, s2['params'],
                         s3['params'])  # fmt: skip
  jax.tree_util.tree_map(np.testing.assert_array_equal, s2['opt_state'],
                         s3['opt_state'])  # fmt: skip
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
