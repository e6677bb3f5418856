"""Image-folder datasets: formats, channels, corrupt files, start-up errors."""

import logging
import os

import numpy as np
import pytest
import smoke_config
from PIL import Image

from vmoe_jsd import config_lib, data, train
from vmoe_jsd.data import folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, array, mode=None, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path, fmt)


@pytest.fixture
def animals(tmp_path):
  """train/{cat,dog}: RGB JPEG, grey PNG, RGBA PNG, palette GIF, a corrupt
  JPEG and a text file; test/{cat,dog}: two RGB PNGs."""
  root = tmp_path / 'animals'
  rng = np.random.default_rng(0)
  colour = {'cat': (200, 30, 30), 'dog': (30, 30, 200)}
  for cls, rgb in colour.items():
    base = np.broadcast_to(np.uint8(rgb), (20, 28, 3)).copy()
    for i in range(3):
      _save(str(root / 'train' / cls / f'rgb{i}.jpg'), base, fmt='JPEG')
    _save(str(root / 'test' / cls / 'a.png'), base)
  grey = np.full((24, 16), 77, np.uint8)
  _save(str(root / 'train' / 'cat' / 'grey.png'), grey, 'L')
  rgba = np.concatenate(
    [np.full((16, 16, 3), 120, np.uint8), np.full((16, 16, 1), 255, np.uint8)],
    -1,
  )
  _save(str(root / 'train' / 'dog' / 'rgba.png'), rgba, 'RGBA')
  palette = Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8))
  palette.convert('P').save(str(root / 'train' / 'dog' / 'palette.gif'))
  with open(root / 'train' / 'cat' / 'broken.jpg', 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 truncated, not a JPEG')
  with open(root / 'train' / 'dog' / 'notes.txt', 'w') as f:
    f.write('not an image, not listed')
  return str(root)


def test_classes_files_and_conversions(animals, caplog):
  ds = data.get_dataset(
    {'name': 'folder', 'data_dir': animals, 'split': 'train'},
    default_image_size=8,
  )
  assert ds.classes == ['cat', 'dog'] and ds.num_classes == 2
  assert ds.image_shape == (8, 8, 3)
  names = [os.path.basename(f) for f in ds.files]
  assert names == ['broken.jpg', 'grey.png', 'rgb0.jpg', 'rgb1.jpg',
                   'rgb2.jpg', 'palette.gif', 'rgb0.jpg', 'rgb1.jpg',
                   'rgb2.jpg', 'rgba.png']  # fmt: skip
  assert ds.labels == [0] * 5 + [1] * 5
  with caplog.at_level(logging.WARNING):
    it = ds.train_batches(10, seed=0, shuffle=False)
    first, second = next(it), next(it)  # two epochs
  for batch in (first, second):
    # broken.jpg (0) is replaced by the next file, grey.png.
    np.testing.assert_array_equal(batch['label'], ds.labels)
    np.testing.assert_array_equal(batch['image'][0], batch['image'][1])
    np.testing.assert_array_equal(batch['orig_size'][:2], [[24, 16], [24, 16]])
  # Grey 77 -> RGB (77, 77, 77); RGBA's opaque 120 keeps 120, alpha dropped.
  np.testing.assert_array_equal(first['image'][1], 77)
  np.testing.assert_array_equal(first['image'][9], 120)
  np.testing.assert_array_equal(first['orig_size'][9], [16, 16])
  # Colour of the JPEGs survives (lossy: within a few levels).
  np.testing.assert_allclose(first['image'][2, 4, 4], (200, 30, 30), atol=6)
  assert ds.num_skipped == 1
  logged = [r.message for r in caplog.records if 'broken.jpg' in r.message]
  assert len(logged) == 1 and 'skipping unreadable image' in logged[0]


def test_grey_channels(animals):
  ds = data.get_dataset(
    {
      'name': 'folder',
      'data_dir': animals,
      'split': 'train',
      'channels': 1,
      'image_size': 6,
    }
  )
  batch = next(ds.train_batches(10, seed=0, shuffle=False))
  assert batch['image'].shape == (10, 6, 6, 1)
  # Pure red (200, 30, 30) in ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B.
  expected = 0.299 * 200 + 0.587 * 30 + 0.114 * 30
  np.testing.assert_allclose(batch['image'][2, 3, 3, 0], expected, atol=6)


def test_startup_errors_name_the_problem(animals, tmp_path):
  cfg = {'name': 'folder', 'data_dir': animals, 'split': 'train',
         'batch_size': 16}  # fmt: skip
  with pytest.raises(ValueError, match='has 10 images, fewer than a global'):
    folder.check(cfg, 16)
  with pytest.raises(FileNotFoundError, match=r"\['test', 'train'\]"):
    folder.check({**cfg, 'split': 'valid'}, 1)
  os.makedirs(tmp_path / 'animals' / 'empty' / 'cat')
  with pytest.raises(ValueError, match='is empty'):
    folder.check({**cfg, 'split': 'empty'}, 1)
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    folder.check({**cfg, 'data_dir': str(tmp_path / 'nowhere')}, 1)
  with pytest.raises(ValueError, match='channels=4'):
    folder.check({**cfg, 'channels': 4}, 1)


def test_folder_trains_through_main(animals, tmp_path):
  """A corrupt file, a grey and an RGBA image: trains and evaluates."""
  config = smoke_config.get_config()
  with config.unlocked():
    config.num_train_steps = 3
    config.dataset.train = dict(
      name='folder',
      data_dir=animals,
      split='train',
      batch_size=8,
      image_size=20,
    )
    config.dataset.test = dict(
      name='folder', data_dir=animals, split='test', batch_size=16
    )
    config.model.num_classes = 2
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 3 and result['num_examples'] == 2
  assert result['skipped_images'] == {'train': 1, 'test': 0}
  # A split smaller than a batch fails in validation, before any work.
  with config.unlocked():
    config.dataset.train.batch_size = 16
  with pytest.raises(ValueError, match='fewer than a global batch of 16'):
    config_lib.validate(config, 8)
