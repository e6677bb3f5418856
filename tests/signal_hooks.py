"""Runs `vmoe_jsd.main` with a hook that sends signals at a set point.

  SIGNAL_HOOK=<hook> python tests/signal_hooks.py <main's flags>

The tests of preemption use it to signal a training process at an exact
step, evaluation batch or compilation, not after a delay: where the signal
lands never depends on how fast the machine is. Hooks (`:<process>` limits
one to that jax process index; every process otherwise):
- `step:<n>:<SIG>[:<process>]`: after the progress line of step n (every
  process computes it, process 0 prints it).
- `eval:<n>:<b>:<SIG>[:<process>]`: as the test evaluation of step n reads
  its batch b (the evaluation abandons the batches after b); `reads` gets
  the (step, batch) of every batch read.
- `setup:<SIG>[:<process>]`: as restore_or_init returns, before any
  compilation of the training loop (a stop requested during start-up).
- `compile:<function>`: two SIGINTs, the second once the first was
  handled, while XLA compiles the jitted `function` for the first time
  (`init_state`: the first long compilation, before training;
  `train_step`: the first one with the guard's handlers installed). Prints
  'hook: SIGINT <i> during compilation' before sending each. SIGINT starts
  as in a foreground process (a background shell passes it ignored).
Signals go to the main thread (pthread_kill), whose handler then runs
before the hook returns, or at once when the main thread waits in XLA.
In-process tests call the hooks with `patch=monkeypatch.setattr`.
SIGNAL_HOOK_MODULE=<module> runs another command than vmoe_jsd.main.
"""

import os
import runpy
import signal
import sys
import threading
import time

import jax
from jax._src import compiler

from vmoe_jsd import train
from vmoe_jsd.evaluation import core


def _to_main(name):
  signal.pthread_kill(threading.main_thread().ident, signal.Signals[name])


def _here(process):
  return process is None or int(process) == jax.process_index()


def at_step(n, name, process=None, patch=setattr):
  original = train._progress_line

  def hooked(step, *args):
    line = original(step, *args)
    if step == int(n) and _here(process):
      _to_main(name)
    return line

  patch(train, '_progress_line', hooked)


def at_setup(name, process=None, patch=setattr):
  original = train.restore_or_init

  def hooked(*args, **kwargs):
    state = original(*args, **kwargs)
    if _here(process):
      _to_main(name)
    return state

  patch(train, 'restore_or_init', hooked)


def in_eval(n, b, name, process=None, patch=setattr, reads=None):
  original_test = train.Evaluations.test
  original_batches = core.eval_batches
  current = {'step': None}

  def test(self, params, step, *args, **kwargs):
    current['step'] = step
    try:
      return original_test(self, params, step, *args, **kwargs)
    finally:
      current['step'] = None

  def batches(*args, **kwargs):
    for i, batch in enumerate(original_batches(*args, **kwargs)):
      if current['step'] == int(n) and i == int(b) and _here(process):
        _to_main(name)
      if reads is not None:
        reads.append((current['step'], i))
      yield batch

  patch(train.Evaluations, 'test', test)
  patch(core, 'eval_batches', batches)


def _two_sigints_then_compile(compile_fn):
  def send():
    time.sleep(0.5)  # Into XLA's compilation; either way the test holds.
    before = signal.getsignal(signal.SIGINT)
    print('hook: SIGINT 1 during compilation', flush=True)
    _to_main('SIGINT')
    # The guard's handler hands SIGINT on when it runs: a second signal
    # before that would coalesce with the first into one handler call.
    while signal.getsignal(signal.SIGINT) is before:
      time.sleep(0.01)
    print('hook: SIGINT 2 during compilation', flush=True)
    _to_main('SIGINT')

  threading.Thread(target=send, daemon=True).start()
  return compile_fn()


def in_compile(name, patch=setattr):
  original = compiler.backend_compile_and_load
  fired = []

  def hooked(backend, module, *args, **kwargs):
    def compile_fn():
      return original(backend, module, *args, **kwargs)

    symbol = str(module.operation.attributes['sym_name']).strip('"')
    if fired or symbol != f'jit_{name}':
      return compile_fn()
    fired.append(True)
    return _two_sigints_then_compile(compile_fn)

  patch(compiler, 'backend_compile_and_load', hooked)


HOOKS = {
  'step': at_step,
  'setup': at_setup,
  'eval': in_eval,
  'compile': in_compile,
}

if __name__ == '__main__':
  kind, *hook_args = os.environ['SIGNAL_HOOK'].split(':')
  if kind == 'compile':
    signal.signal(signal.SIGINT, signal.default_int_handler)
  HOOKS[kind](*hook_args)
  module = os.environ.get('SIGNAL_HOOK_MODULE', 'vmoe_jsd.main')
  sys.argv[0] = module
  runpy.run_module(module, run_name='__main__', alter_sys=True)
