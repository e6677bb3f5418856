"""Two processes through jax.distributed compute what one process does.

Each process has 2 CPU devices; together they form a (2 data x 2 expert)
mesh, read their halves of every global batch, exchange tokens between
processes in the MoE all-to-all and write one checkpoint. A single process
with 4 devices and the same mesh must reach the same results.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'tests', 'smoke_config.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, num_devices, *extra):
  env = {
    **os.environ,
    'XLA_FLAGS': '',
    'JAX_NUM_CPU_DEVICES': str(num_devices),
    'JAX_COMPILATION_CACHE_DIR': jax.config.jax_compilation_cache_dir,
  }
  return subprocess.Popen(
    [sys.executable, '-m', 'vmoe_jsd.main', f'--config={SMOKE}',
     f'--workdir={workdir}', '--config.num_expert_partitions=2', *extra],
    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    text=True,
  )  # fmt: skip


@pytest.mark.slow  # ~75 s on 2 cores: three processes compile at once.
def test_two_processes_match_one(tmp_path):
  port = _free_port()
  multi = str(tmp_path / 'multi')
  coordinator = f'--coordinator_address=127.0.0.1:{port}'
  procs = [
    _launch(multi, 2, '--distributed', coordinator, '--num_processes=2',
            f'--process_id={i}')
    for i in range(2)
  ]  # fmt: skip
  single = _launch(str(tmp_path / 'single'), 4)
  outputs = [p.communicate(timeout=600)[0] for p in (*procs, single)]
  for p, out in zip((*procs, single), outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert "mesh {'data': 2, 'expert': 2}" in outputs[0]
  with open(os.path.join(multi, 'results.json')) as f:
    got = json.load(f)
  with open(os.path.join(tmp_path, 'single', 'results.json')) as f:
    want = json.load(f)
  assert got['num_examples'] == want['num_examples'] == 32
  assert got['accuracy'] == want['accuracy']
  for layer, figs in want['routing'].items():
    for key in ('agreement', 'kappa', 'jsd', 'confidence'):
      np.testing.assert_allclose(got['routing'][layer][key], figs[key],
                                 rtol=1e-4)  # fmt: skip
  assert os.path.isdir(os.path.join(multi, 'checkpoints', '6'))
