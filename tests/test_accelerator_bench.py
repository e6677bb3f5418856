"""benchmarks/accelerator.py runs at its smoke size, so it cannot rot.

Nothing is timed here: the test checks that every part runs on the backend
at hand (two simulated CPU devices, so the all-to-all part runs too) and
that the tables have their rows; the peak table is checked by hand.
"""

import importlib
import os
import sys

import commands
import pytest

BENCH = os.path.join(commands.ROOT, 'benchmarks')


def test_peak_table_by_device_kind(monkeypatch):
  monkeypatch.syspath_prepend(BENCH)
  a = importlib.import_module('accelerator')  # Its absl flags: none clash.
  assert a.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert a.peak_flops('NVIDIA H100 PCIe', 'float32') == 378e12
  assert a.peak_flops('NVIDIA H200', 'bfloat16') == 989e12
  assert a.peak_flops('TPU v5 lite', 'float32') == 197e12
  assert a.peak_flops('TPU v4', 'bfloat16') == 275e12
  assert a.peak_flops('cpu', 'float32') is None


@pytest.mark.processes  # Its own process: 2 devices, its absl flags.
@pytest.mark.filterwarnings('ignore')
def test_smoke_run_prints_every_table():
  proc = commands.run(
    [
      sys.executable,
      'accelerator.py',
      '--smoke',
      '--dtypes=float32',
      '--dispatchers=einsum,indices',
    ],
    cwd=BENCH,
    num_devices=2,
    timeout=1200,
  )
  out = proc.stdout
  assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
  assert '2 x cpu' in out
  for section in (
    '## Train step',
    '## On-device augmentation',
    '## Host input pipeline',
    '## Expert-parallel all-to-all',
  ):
    assert section in out, out
  assert '| float32 | einsum |' in out and '| float32 | indices |' in out
  assert '| RandAugment(2, 10) |' in out and '| crop + flip only |' in out
  assert '| 1 |' in out  # one decoding thread
  assert '| encoderblock_1 |' in out  # the tiny model's MoE block
  assert 'n/a' in out  # no peak for a CPU: MFU is not made up
