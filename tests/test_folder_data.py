"""Image-folder datasets: formats, channels, corrupt files, start-up errors."""

import logging
import os
import threading

import numpy as np
import pytest
import smoke_config
from PIL import Image

from vmoe_jsd import config_lib, data, train
from vmoe_jsd.data import folder, indexed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, array, mode=None, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path, fmt)


@pytest.fixture
def animals(tmp_path):
  """train/{cat,dog}: RGB JPEG, grey PNG, RGBA PNG, palette GIF, a corrupt
  JPEG and a text file; test/{cat,dog}: two RGB PNGs. train/00_empty/ has
  no image (issue 16: it shifted every train label by one)."""
  root = tmp_path / 'animals'
  os.makedirs(root / 'train' / '00_empty')
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


@pytest.mark.slow
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


def _png(path, value=100):
  _save(str(path), np.full((6, 6, 3), value, np.uint8))


def test_labels_are_the_union_of_the_splits_classes(tmp_path):
  """Class folders with an image in any split, sorted: an empty folder in
  one split and a class missing from another shift no label, and every
  split agrees (by hand: ['bird', 'cat', 'dog'])."""
  root = tmp_path / 'pets'
  os.makedirs(root / 'train' / '00_empty')  # no image anywhere: no class
  os.makedirs(root / 'test' / 'aaa_empty')
  for cls in ('bird', 'cat', 'dog'):
    _png(root / 'train' / cls / 'a.png')
  for cls in ('cat', 'dog'):  # no bird in test
    _png(root / 'test' / cls / 'a.png')
  (root / 'test' / 'zebra').mkdir()
  (root / 'test' / 'zebra' / 'x.png').mkdir()  # only a non-image entry
  splits = {s: data.get_dataset({'name': 'folder', 'data_dir': str(root),
                                 'split': s}, default_image_size=4)
            for s in ('train', 'test')}  # fmt: skip
  for ds in splits.values():
    assert ds.classes == ['bird', 'cat', 'dog'] and ds.num_classes == 3
  assert splits['train'].labels == [0, 1, 2]
  assert splits['test'].labels == [1, 2]  # cat, dog: as in train
  assert folder.list_classes(str(root)) == ['bird', 'cat', 'dog']


def test_num_classes_against_an_image_folder(animals):
  """model.num_classes is checked against the folder's classes at start-up
  (2 here: cat and dog; 00_empty has no image)."""
  config = smoke_config.get_config()
  with config.unlocked():
    for split, batch in (('train', 8), ('test', 16)):
      config.dataset[split] = dict(name='folder', data_dir=animals,
                                   split=split, batch_size=batch)  # fmt: skip
    config.model.num_classes = 3
  with pytest.raises(ValueError) as e:
    config_lib.validate(config, 8)
  assert str(e.value) == (
    'config.model.num_classes=3 is invalid: dataset.train (folder) has 2 '
    'classes; set model.num_classes=2'
  )
  with config.unlocked():
    config.model.num_classes = 2
  config_lib.validate(config, 8)


def _bad_entries(root):
  """Image-named entries that are not readable regular files, in
  train/cat: {name: what it is}. Returns also the good files' names."""
  cat = root / 'train' / 'cat'
  for i in range(3):
    _png(cat / f'good{i}.png', 50 * i)
  os.symlink(cat / 'good0.png', cat / 'link_to_good.png')  # a fine image
  (cat / 'dir.png').mkdir()
  os.symlink(root / 'nowhere.png', cat / 'dangling.png')
  os.symlink(cat / 'loop_b.png', cat / 'loop_a.png')
  os.symlink(cat / 'loop_a.png', cat / 'loop_b.png')
  os.mkfifo(cat / 'fifo.png')
  _png(cat / 'secret.png')
  os.chmod(cat / 'secret.png', 0)
  bad = {'dir.png': 'a directory', 'dangling.png': 'dangling symlink',
         'loop_a.png': 'symlink loop', 'loop_b.png': 'symlink loop',
         'fifo.png': 'not a regular file'}  # fmt: skip
  good = ['good0.png', 'good1.png', 'good2.png', 'link_to_good.png']
  if os.geteuid() == 0:  # root reads a file whatever its mode
    good.append('secret.png')
  else:
    bad['secret.png'] = 'not readable'
  return bad, sorted(good)


def _finishes(fn, fifos, seconds=60):
  """Runs fn in a thread; True if it returned within `seconds`. Then, while
  it still runs, opening the FIFOs' write ends releases each reader blocked
  in open() (the old code), so that the test process can exit."""
  result = {}
  thread = threading.Thread(target=lambda: result.update(out=fn()),
                            daemon=True)  # fmt: skip
  thread.start()
  thread.join(seconds)
  finished = 'out' in result
  for _ in range(300):
    if not thread.is_alive():
      break
    for fifo in fifos:
      try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:
        pass  # no reader blocked on it: nothing to release
    thread.join(0.1)
  return finished


def test_non_regular_entries_are_skipped_counted_and_never_opened(
  tmp_path, caplog
):
  """A directory named x.png, a dangling symlink, a symlink loop, a FIFO
  and an unreadable file: left out when listed, counted, logged once at
  start-up; reading the split never blocks (the FIFO hung step 1 forever)."""
  root = tmp_path / 'odd'
  bad, good = _bad_entries(root)
  _png(root / 'test' / 'cat' / 'a.png')
  with caplog.at_level(logging.WARNING):
    ds = data.get_dataset({'name': 'folder', 'data_dir': str(root),
                           'split': 'train'}, default_image_size=4)  # fmt: skip
  assert [os.path.basename(f) for f in ds.files] == good
  rejected = {os.path.basename(p): why for p, why in ds.rejected.items()}
  assert sorted(rejected) == sorted(bad)
  for name, what in bad.items():
    assert what in rejected[name], (name, rejected[name])
  assert ds.num_skipped == len(bad)
  logged = [r.getMessage() for r in caplog.records if 'skipped' in
            r.getMessage()]  # fmt: skip
  assert len(logged) == 1 and f'skipped {len(bad)} entries' in logged[0]

  def read_all():
    batch = next(ds.train_batches(len(good), seed=0, shuffle=False))
    evals = list(ds.eval_batches(len(good)))
    return batch, evals

  fifo = str(root / 'train' / 'cat' / 'fifo.png')
  assert _finishes(read_all, [fifo])
  assert ds.num_skipped == len(bad)  # nothing else met


def test_entry_turned_into_a_fifo_after_listing_is_skipped(tmp_path, caplog):
  """Opened with O_NONBLOCK and checked with fstat: a file replaced by a
  FIFO between the listing and the read is skipped (its slot takes the
  next file), not waited on."""
  cat = tmp_path / 'late' / 'train' / 'cat'
  for i in range(3):
    _png(cat / f'{i}.png', 60 * i)
  ds = data.get_dataset({'name': 'folder', 'data_dir': str(tmp_path / 'late'),
                         'split': 'train'}, default_image_size=4)  # fmt: skip
  os.remove(cat / '1.png')
  os.mkfifo(cat / '1.png')
  out = {}

  def read():
    out['batch'] = next(ds.train_batches(3, seed=0, shuffle=False))
    out['eval'] = next(ds.eval_batches(3))
    return True

  with caplog.at_level(logging.WARNING):
    assert _finishes(read, [str(cat / '1.png')])
  np.testing.assert_array_equal(out['batch']['image'][:, 0, 0, 0],
                                [0, 120, 120])  # fmt: skip
  np.testing.assert_array_equal(out['eval']['mask'], [True, False, True])
  assert ds.num_skipped == 1
  assert any('not a regular file' in r.getMessage() for r in caplog.records)


def test_a_split_of_unreadable_images_names_one_in_one_line(tmp_path):
  """Undecodable images are skipped (above); a split with none readable is
  one line naming one of them (indexed.DataError: exit 2 from main)."""
  for cls in ('cat', 'dog'):
    os.makedirs(tmp_path / 'train' / cls)
    (tmp_path / 'train' / cls / 'a.jpg').write_bytes(b'not a JPEG')
  ds = data.get_dataset({'name': 'folder', 'data_dir': str(tmp_path),
                         'split': 'train'}, default_image_size=4)  # fmt: skip
  with pytest.raises(indexed.DataError) as e:
    next(ds.train_batches(2, seed=0))
  first = str(tmp_path / 'train' / 'cat' / 'a.jpg')
  assert str(e.value) == (
    f'folder:{tmp_path}/train: no readable image in the split (2 unreadable;'
    f' e.g. {first}: UnidentifiedImageError: cannot identify image file); '
    'expected image files (JPEG, PNG, GIF, ...) that PIL can decode'
  )
