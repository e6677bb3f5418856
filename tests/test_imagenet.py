"""configs/imagenet.py:runlocal end to end through the real tfds path.

The offline mini `imagenet2012` (data/mini.py: the real builder's name,
version and features, generated JPEGs, ArrayRecord) is read through
tfds.data_source, trained on and evaluated; a run killed after a checkpoint
resumes with the very batches an uninterrupted run used, and reads only the
records of the batches it uses. (The command line's data_dir flags of the
tfds configs: test_configs.py.)
"""

import importlib.util
import json
import os

import numpy as np
import pytest

pytest.importorskip('tensorflow_datasets')

from vmoe_jsd import train  # noqa: E402
from vmoe_jsd.data import indexed, tfds_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'imagenet.py')


def _runlocal(data_dir):
  spec = importlib.util.spec_from_file_location('imagenet_cfg', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('runlocal')
  config.dataset.train.data_dir = data_dir
  config.dataset.test.data_dir = data_dir
  return config


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_batches_reading_one_batch(
  tmp_path, monkeypatch, capsys
):
  """The mini dataset is prepared under the real name; a run killed before
  step 4 and resumed trains and evaluates through it."""
  data_dir = str(tmp_path / 'tfds')
  config = _runlocal(data_dir)
  batch = config.dataset.train.batch_size
  batches = []  # (run, step, batch)
  loads = []  # (run, record index) of training records, in read order
  run = {'name': None, 'crash_at': None}

  original_batches = tfds_data.TfdsDataset.train_batches
  original_load = indexed.IndexedDataset._decode_train

  def recording_batches(self, batch_size, **kwargs):
    step = kwargs.get('start_step', 0)
    for b in original_batches(self, batch_size, **kwargs):
      step += 1
      if step == run['crash_at']:
        raise KeyboardInterrupt(f'simulated kill before step {step}')
      batches.append((run['name'], step, b))
      yield b

  def recording_load(self, index):
    loads.append((run['name'], int(index)))
    return original_load(self, index)

  monkeypatch.setattr(tfds_data.TfdsDataset, 'train_batches', recording_batches)
  monkeypatch.setattr(indexed.IndexedDataset, '_decode_train', recording_load)

  run.update(name='killed', crash_at=4)
  workdir = str(tmp_path / 'run')
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  run.update(name='resumed', crash_at=None)
  capsys.readouterr()
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert '[step 4/4]' in out and 'test accuracy' in out
  # The mini dataset was prepared under the real name, as ArrayRecord.
  prepared = os.path.join(data_dir, 'imagenet2012', '5.1.0')
  assert any('array_record' in f for f in os.listdir(prepared))
  with open(os.path.join(workdir, 'results.json')) as f:
    result = json.load(f)
  assert result['step'] == 4 and result['num_examples'] == 16

  def of(name):
    return {s: b for r, s, b in batches if r == name}

  # Until it was killed, the first run was an uninterrupted one: its step 3
  # is the reference; step 4 comes from a fresh stream from step 0.
  killed, resumed = of('killed'), of('resumed')
  assert min(resumed) == 3 and max(killed) == 3
  fresh = tfds_data.TfdsDataset(
    'imagenet2012',
    'train[:99%]',
    config.dataset.train.image_size,
    data_dir=data_dir,
  ).train_batches(batch, seed=config.seed)
  expected = {3: killed[3], 4: [next(fresh) for _ in range(4)][3]}
  for step in (3, 4):
    for key in ('image', 'label', 'orig_size'):
      np.testing.assert_array_equal(resumed[step][key], expected[step][key])
  # Reads: the killed run's k-th group of `batch` reads is batch k (a batch
  # is decoded whole before the next); the resumed run's first group is
  # batch 3 itself, nothing before it.
  killed_reads = [i for r, i in loads if r == 'killed']
  resumed_reads = [i for r, i in loads if r == 'resumed']
  assert len(resumed_reads) % batch == 0
  assert sorted(resumed_reads[:batch]) == sorted(
    killed_reads[2 * batch : 3 * batch]
  )
