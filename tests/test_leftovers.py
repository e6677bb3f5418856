"""What the commands and tests leave in the temp directory: nothing.

tfds made an empty `tmp*tfds` folder in the temp directory for every
builder of a dataset not prepared in its data_dir (hundreds after a test
suite; issue 24). Each test here points `tempfile` at a fresh folder of its
own (so other tests running at the same time cannot disturb the count) and
checks what is in it afterwards.

The JAX compilation cache `vmoe_jsd_jax_cache` (tests/conftest.py) stays in
the temp directory on purpose: it is what makes the next run fast.
"""

import os
import tempfile

import numpy as np
import pytest

pytest.importorskip('tensorflow_datasets')

from vmoe_jsd import data  # noqa: E402
from vmoe_jsd.data import mini, tfds_data  # noqa: E402


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
  """tempfile's directory for the test: an empty folder of its own."""
  path = tmp_path / 'temp'
  path.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(path))
  return path


def test_the_check_sees_tfds_leftover(temp_dir, tmp_path, monkeypatch):
  # tfds's own method (unwrapped) leaves its empty folder: the fixture's
  # folder is where it lands, so the tests below would see it.
  tfds = mini.import_tfds()
  info_cls = tfds.core.DatasetInfo
  original = info_cls.initialize_from_bucket.__wrapped__
  monkeypatch.setattr(info_cls, 'initialize_from_bucket', original)
  tfds.builder('cifar10', data_dir=str(tmp_path / 'unprepared'))
  (left,) = os.listdir(temp_dir)
  assert left.startswith('tmp') and left.endswith('tfds')
  assert os.listdir(temp_dir / left) == []


def test_tfds_builders_and_splits_leave_nothing(temp_dir, tmp_path):
  # A dataset's classes from its code (nothing prepared: the path
  # `inspect_step` takes on the ImageNet config), a mini dataset's first
  # preparation, then reading it as the tests do.
  unprepared = str(tmp_path / 'unprepared')
  assert tfds_data.num_classes('imagenet2012', unprepared) == 1000
  assert tfds_data.num_classes('cifar10', unprepared) == 10
  cfg = {
    'name': 'tfds',
    'tfds_name': 'cifar10',
    'split': 'train',
    'image_size': 32,
    'data_dir': str(tmp_path / 'mini'),
    'mini': True,
  }
  ds = data.get_dataset(cfg)
  batch = next(ds.train_batches(4, seed=0))
  assert batch['image'].shape == (4, 32, 32, 3)
  assert np.all((batch['label'] >= 0) & (batch['label'] < 10))
  test = data.get_dataset({**cfg, 'split': 'test'})
  assert len(test) == mini.SPLITS['test']
  assert os.listdir(temp_dir) == []
