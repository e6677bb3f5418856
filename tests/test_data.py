"""Host datasets: IDX parsing, resumable order, evaluation padding."""

import gzip
import os
import sys

import commands
import numpy as np
import pytest

from vmoe_jsd import data
from vmoe_jsd.data import arrays, fashion_mnist, indexed


def write_idx(path, array, type_code=0x08):
  header = bytes([0, 0, type_code, array.ndim]) + b''.join(
    int(n).to_bytes(4, 'big') for n in array.shape
  )
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype('>u1' if type_code == 8 else '>i4').tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
  rng = np.random.default_rng(0)
  images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            for s, n in (('train', 30), ('test', 12))}  # fmt: skip
  labels = {s: rng.integers(0, 10, len(images[s]), dtype=np.uint8)
            for s in images}  # fmt: skip
  for split, (img_file, lbl_file) in fashion_mnist.FILES.items():
    write_idx(str(tmp_path / img_file), images[split])
    write_idx(str(tmp_path / lbl_file), labels[split])
  return tmp_path, images, labels


def test_fashion_mnist_reads_idx_files(fake_fmnist):
  path, images, labels = fake_fmnist
  ds = data.get_dataset(
    {'name': 'fashion_mnist', 'split': 'train', 'data_dir': str(path)}
  )
  assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
  np.testing.assert_array_equal(ds.images[..., 0], images['train'])
  np.testing.assert_array_equal(ds.labels, labels['train'])
  sub = fashion_mnist.load('test[4:10]', str(path))
  np.testing.assert_array_equal(sub.labels, labels['test'][4:10])


def test_idx_errors_name_the_problem(fake_fmnist, tmp_path):
  path, _, _ = fake_fmnist
  truncated = str(tmp_path / 'bad.gz')
  with gzip.open(os.path.join(path, 't10k-images-idx3-ubyte.gz')) as f:
    content = f.read()
  with gzip.open(truncated, 'wb') as f:
    f.write(content[:-10])
  with pytest.raises(ValueError, match='truncated or corrupt'):
    fashion_mnist.read_idx(truncated)
  with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
    fashion_mnist.load('train', str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match="split='valid' is unknown"):
    fashion_mnist.load('valid', str(path))


def test_train_order_is_a_function_of_the_step_and_covers_epochs():
  ds = arrays.ArrayDataset(
    np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1),
    np.arange(10, dtype=np.int32), num_classes=10,
  )  # fmt: skip
  it = ds.train_batches(4, seed=3)
  stream = np.concatenate([next(it)['label'] for _ in range(5)])  # 20
  # Each epoch of 10 is a permutation; epochs differ.
  assert sorted(stream[:10]) == list(range(10))
  assert sorted(stream[10:20]) == list(range(10))
  assert list(stream[:10]) != list(stream[10:20])
  # Resuming at step 3 yields exactly batches 3, 4.
  resumed = ds.train_batches(4, seed=3, start_step=3)
  np.testing.assert_array_equal(next(resumed)['label'], stream[12:16])
  # Two processes split every global batch.
  p0 = ds.train_batches(4, seed=3, process_index=0, process_count=2)
  p1 = ds.train_batches(4, seed=3, process_index=1, process_count=2)
  np.testing.assert_array_equal(
    np.concatenate([next(p0)['label'], next(p1)['label']]), stream[:4]
  )


def test_eval_batches_pad_with_mask():
  ds = data.get_dataset({'name': 'synthetic', 'split': 'test',
                         'num_examples': 10, 'image_size': 8})  # fmt: skip
  batches = list(ds.eval_batches(4))
  assert [b['mask'].sum() for b in batches] == [4, 4, 2]
  assert all(len(b['label']) == 4 for b in batches)
  real = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(real, ds.labels)


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="'mnist' is unknown; choose one of"):
    data.get_dataset({'name': 'mnist', 'split': 'train'})


def test_prefetch_reraises_producer_errors():
  def gen():
    yield 1
    raise RuntimeError('boom')

  it = data.prefetch(gen())
  assert next(it) == 1
  with pytest.raises(RuntimeError, match='boom'):
    next(it)


def test_index_sampler_crosses_epochs_inside_a_batch():
  sampler = indexed.IndexSampler(7, seed=2)
  # Batches of 5 over 7 records: batch 1 holds positions 5..9, across the
  # first epoch boundary. By definition position q reads perm_(q//7)[q%7].
  perms = [np.random.default_rng([2, e, 0x5EED]).permutation(7)
           for e in range(3)]  # fmt: skip
  expected = np.concatenate(perms)[: 4 * 5].reshape(4, 5)
  for step in range(4):
    np.testing.assert_array_equal(sampler.indices(step, 5, 0, 5),
                                  expected[step])  # fmt: skip
    # Any slice of the slots (one process's share) is the same slice.
    np.testing.assert_array_equal(sampler.indices(step, 5, 2, 4),
                                  expected[step, 2:4])  # fmt: skip


@pytest.mark.processes  # The console of a process, TensorFlow's included.
def test_first_mini_preparation_prints_one_line(tmp_path):
  """data/mini.py's first preparation: one line on the console, not tfds's
  progress bars (raw escape codes), its "Downloading and preparing"
  message, absl warnings or TensorFlow's banners; the next call nothing."""
  prepare = (
    f'mini.prepare("cifar10", {str(tmp_path)!r}, {{"train": 4, "test": 2}})'
  )
  code = (
    f'import sys; from vmoe_jsd.data import mini; {prepare}; '
    f'sys.stdout.flush(); sys.stderr.write("SECOND\\n"); {prepare}'
  )
  proc = commands.run(
    [sys.executable, '-c', code], timeout=300, TF_CPP_MIN_LOG_LEVEL='0'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  first, _, second = (proc.stdout + proc.stderr).partition('SECOND\n')
  assert first.count('\n') == 1 and first.endswith('\n'), first[:3000]
  assert first.startswith('Preparing an offline mini cifar10 (6 generated')
  assert '\x1b' not in first and '\r' not in first
  assert second == ''


def _damaged(fake_fmnist, damage):
  """The train split's files with `damage(images path, labels path)`
  applied; the DataError message of loading them."""
  path, _, _ = fake_fmnist
  images, labels = (str(path / f) for f in fashion_mnist.FILES['train'])
  damage(images, labels)
  with pytest.raises(indexed.DataError) as e:
    data.get_dataset(
      {'name': 'fashion_mnist', 'split': 'train', 'data_dir': str(path)}
    )
  assert '\n' not in str(e.value)
  return str(e.value), images, labels


def _cut(path, keep):
  with open(path, 'rb') as f:
    content = f.read()
  with open(path, 'wb') as f:
    f.write(content[:keep])


def test_a_truncated_fashion_mnist_file_is_named(fake_fmnist):
  """Each damage: one line naming the file and what is wrong (issue 24)."""
  text, images, _ = _damaged(fake_fmnist, lambda i, _: _cut(i, 200))
  assert text == (
    f'{images} is truncated (the gzip stream ends early); copy the file again'
  )


def test_the_other_splits_labels_are_named(fake_fmnist):
  path = fake_fmnist[0]
  test_labels = str(path / fashion_mnist.FILES['test'][1])
  copy = lambda _, lbl: open(lbl, 'wb').write(open(test_labels, 'rb').read())
  text, images, labels = _damaged(fake_fmnist, copy)
  assert text == (
    f'{images} holds 30 images but {labels} holds 12 labels; the two files '
    'must be of the same split'
  )


def test_wrong_format_fashion_mnist_files_are_named(fake_fmnist, tmp_path):
  def plain(images, _):  # Not gzip at all.
    with open(images, 'wb') as f:
      f.write(b'P5 28 28 255 not an idx file')

  text, images, _ = _damaged(fake_fmnist, plain)
  assert text.startswith(f'{images} is not a gzipped IDX file (Not a gzip')

  def bad_magic(images, _):
    with gzip.open(images, 'wb') as f:
      f.write(b'\x1f\x8b\x08\x03' + bytes(100))

  text, images, _ = _damaged(fake_fmnist, bad_magic)
  assert text.startswith(f"{images} is not an IDX file (bad magic b'\\x1f")

  def swapped(images, labels):  # The labels file over the images file.
    with open(labels, 'rb') as f:
      content = f.read()
    with open(images, 'wb') as f:
      f.write(content)

  text, images, _ = _damaged(fake_fmnist, swapped)
  assert text.startswith(f'{images} holds an array of shape (30,), not images')
