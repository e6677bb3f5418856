"""Two processes: checkpoints damaged on one process's side.

Two processes through jax.distributed on loopback (as test_multiprocess.py),
2 CPU devices each, save a state whose kernel is sharded over all 4 devices
(each process writes its half, in its own ocdbt.process_<i> files) and a
replicated bias, at steps 2, 4 and 6. Process 1's data file of step 6 is
cut in half (process 1's read fails, process 0's succeeds) and one bit of
its data file of step 4 is flipped (it reads without error, into a wrong
kernel that only process 1 holds). Both processes must reject steps 6 and
4 with the same lines and restore step 2.
"""

import json
import pathlib
import socket
import sys

import commands
import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

# Importing these makes no jax call: jax.distributed can start after them.
from vmoe_jsd import checkpoints

KERNEL_SHAPE = (8, 512)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _values(step):
  rng = np.random.default_rng(0)  # Random floats: data files incompressible.
  kernel = rng.normal(size=KERNEL_SHAPE).astype(np.float32) + step
  return kernel, np.arange(16, dtype=np.float32) * step


@pytest.mark.slow  # ~25 s on 2 busy cores: two processes start jax.
def test_damage_on_one_process_side_is_rejected_on_both(tmp_path):
  port = _free_port()
  procs = [
    commands.start(
      [sys.executable, __file__, str(tmp_path), str(port), str(i)],
      JAX_NUM_CPU_DEVICES='2',
    )
    for i in range(2)
  ]
  try:  # A process waiting for the other (a collective out of step) hangs.
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  results = []
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith('RESULT ')]
    results.append(json.loads(line[len('RESULT ') :]))
  for r in results:
    assert r['step'] == 2
    assert r['values_match_step_2']
    six, four = r['messages']
    assert six.startswith('WARNING: checkpoint at step 6 ')
    assert '(process 1: ' in six and 'Trying step 4' in six
    assert four.startswith('WARNING: checkpoint at step 4 ')
    assert 'checksum mismatch in kernel' in four and 'Trying step 2' in four
  # Detected the same way on both: the same lines.
  assert results[0]['messages'] == results[1]['messages']


# ----------------------------------------------------------------------------
# One process of the test (run as a script).
# ----------------------------------------------------------------------------
def _worker(workdir, port, process_id):
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=2,
    process_id=process_id,
  )
  mesh = jax.make_mesh(
    (4,), ('expert',), axis_types=(jax.sharding.AxisType.Auto,)
  )
  shardings = {
    'kernel': NamedSharding(mesh, PartitionSpec('expert')),
    'bias': NamedSharding(mesh, PartitionSpec()),
  }

  def state(step):
    kernel, bias = _values(step)
    return {
      name: jax.make_array_from_callback(
        value.shape, shardings[name], lambda i, v=value: v[i]
      )
      for name, value in (('kernel', kernel), ('bias', bias))
    }

  ckpt = checkpoints.Checkpointer(workdir, every_steps=1, keep_last=5)
  for step in (2, 4, 6):
    assert ckpt.maybe_save(step, state(step))
  ckpt.close()
  multihost_utils.sync_global_devices('saved')
  if process_id == 0:
    for step in (4, 6):
      folder = pathlib.Path(workdir, 'checkpoints', str(step))
      files = list(folder.glob('state/ocdbt.process_1/d/*'))
      path = max(files, key=lambda p: p.stat().st_size)
      data = bytearray(path.read_bytes())
      if step == 6:
        del data[len(data) // 2 :]
      else:  # Inside the compressed data (not a frame header).
        data[len(data) * 3 // 10] ^= 0x10
      path.write_bytes(bytes(data))
  multihost_utils.sync_global_devices('damaged')

  messages = []
  ckpt = checkpoints.Checkpointer(workdir, every_steps=1, log=messages.append)
  abstract = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
    for k, v in zip(('kernel', 'bias'), _values(0), strict=True)
  }
  restored, step = ckpt.restore_latest(abstract)
  ckpt.close()
  want = dict(zip(('kernel', 'bias'), _values(2), strict=True))
  match = all(
    np.array_equal(np.asarray(s.data), want[k][s.index])
    for k, x in restored.items()
    for s in x.addressable_shards
  )
  result = {
    'step': step,
    'messages': messages,
    'values_match_step_2': bool(match),
  }
  print('RESULT ' + json.dumps(result), flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
