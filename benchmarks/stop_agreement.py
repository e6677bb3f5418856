r"""Cost of agreeing on a stop request across processes, per check.

  python benchmarks/stop_agreement.py [--checks=300] [--processes=2]

Starts `--processes` processes on this machine, connected through
jax.distributed on loopback (one CPU device each), and times, per call:
- `agree`: resilience.PreemptionGuard's agreement (a barrier at the
  coordination service, then one directory read of the requests: host RPCs,
  no device work);
- `allgather`: the device-side alternative, multihost_utils.process_allgather
  of one int32 (a jitted collective the host waits for);
- `sync_point`: JAX's multihost_utils.reached_preemption_sync_point (what
  the guard called before; a local check until a preemption notice).
Each is timed alone (median of `--checks` calls) and, for `agree`, also
after a 512x512 matmul was dispatched (the host does not wait for the
device there). Process 0 prints the table and the growth of its peak RSS
(it hosts the coordination service, which keeps every barrier's state).
"""

import os
import resource
import socket
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils

from vmoe_jsd import cli, resilience

_CHECKS = flags.DEFINE_integer(
  'checks', 300, 'calls timed per method', lower_bound=1
)
_PROCESSES = flags.DEFINE_integer(
  'processes', 2, 'processes to start', lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, '(internal)')
_PORT = flags.DEFINE_integer('port', 0, '(internal)')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _median_ms(fn, n):
  times = []
  for i in range(n):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _worker():
  jax.config.update('jax_num_cpu_devices', 1)
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{_PORT.value}',
    num_processes=_PROCESSES.value, process_id=_PROCESS_ID.value,
  )  # fmt: skip
  n = _CHECKS.value
  guard = resilience.PreemptionGuard()
  x = jax.numpy.ones((512, 512))
  work = jax.jit(lambda a: (a @ a).sum())
  work(x).block_until_ready()
  multihost_utils.process_allgather(np.int32(0))  # Compile.
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rows = {
    'agree': _median_ms(lambda i: guard.should_stop(i), n),
    'agree after dispatch': _median_ms(
      lambda i: (work(x), guard.should_stop(n + i)), n),
    'allgather': _median_ms(
      lambda i: multihost_utils.process_allgather(np.int32(0)), n),
    'sync_point': _median_ms(
      lambda i: multihost_utils.reached_preemption_sync_point(i), n),
  }  # fmt: skip
  t0 = time.perf_counter()
  work(x).block_until_ready()
  rows['(the device computation)'] = 1e3 * (time.perf_counter() - t0)
  # Process 0 runs the coordination service, which keeps each barrier.
  grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
  if jax.process_index() == 0:
    print(f'{_PROCESSES.value} processes, median of {n} calls (ms):')
    for name, ms in rows.items():
      print(f'  {name:26s} {ms:8.3f}')
    print(f'  peak RSS growth over the {4 * n} calls: {grown / 1024:.1f} MiB')


def main(_):
  if _PROCESS_ID.value >= 0:
    return _worker()
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': ''}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [
    subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f'--process_id={i}',
       f'--port={port}', f'--processes={_PROCESSES.value}',
       f'--checks={_CHECKS.value}'], cwd=root, env=env)
    for i in range(_PROCESSES.value)
  ]  # fmt: skip
  sys.exit(max(p.wait() for p in procs))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
