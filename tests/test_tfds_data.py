"""The index pipeline over real (tiny) tfds ArrayRecord datasets made offline.

References are computed independently of the code under test: expected
canvases of linear ramps (a linear function stays linear under any
normalised resampling), record orders from the definition of the stream.
"""

import io
import logging

import numpy as np
import pytest

pytest.importorskip('tensorflow_datasets')
pytest.importorskip('tensorflow')

from PIL import Image  # noqa: E402

from vmoe_jsd import data  # noqa: E402
from vmoe_jsd.data import indexed, mini  # noqa: E402

tfds = mini.import_tfds()  # Its builders leave no tmp*tfds folder behind.

# (height, width) of the 12 training images; label = index % 3.
SIZES = [
  (30, 40),
  (40, 30),
  (24, 24),
  (36, 60),
  (20, 50),
  (50, 20),
  (33, 44),
  (44, 33),
  (28, 28),
  (25, 45),
  (45, 25),
  (32, 48),
]


def ramp(height, width, index):
  """Red: ramp over x from 0 to 240; green: over y; blue: the index."""
  x = np.linspace(0, 240, width)[None, :].repeat(height, 0)
  y = np.linspace(0, 240, height)[:, None].repeat(width, 1)
  blue = np.full((height, width), 10 * index)
  return np.stack([x, y, blue], -1).round().astype(np.uint8)


class RampImages(tfds.core.GeneratorBasedBuilder):
  """12 train / 5 test PNG ramps of different sizes (lossless)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3),
                                     encoding_format='png'),
        'label': tfds.features.ClassLabel(num_classes=3),
      })
    )  # fmt: skip

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      'train': self._generate_examples(SIZES),
      'test': self._generate_examples(SIZES[:5]),
    }

  def _generate_examples(self, sizes):
    for i, (h, w) in enumerate(sizes):
      yield i, {'image': ramp(h, w, i), 'label': i % 3}


@pytest.fixture(scope='module')
def ramp_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  RampImages(data_dir=path, file_format='array_record').download_and_prepare()
  return path


@pytest.fixture(scope='module')
def generated(ramp_dir):
  """Generation index of each stored record (tfds shuffles on writing)."""
  source = tfds.data_source('ramp_images', split='train', data_dir=ramp_dir,
                            download=False)  # fmt: skip
  return np.asarray([source[i]['image'][0, 0, 2] // 10 for i in range(12)])


def _cfg(data_dir, split='train', **kw):
  return {'name': 'tfds', 'tfds_name': 'ramp_images', 'split': split,
          'image_size': 16, 'data_dir': data_dir, **kw}  # fmt: skip


def _record_of(batch_image):
  """Training record index of each canvas, read from its blue channel."""
  return (batch_image[:, 4, 4, 2].astype(int) + 5) // 10


def test_canvas_is_the_whole_image_and_orig_size_is_exact(ramp_dir):
  ds = data.get_dataset(_cfg(ramp_dir))
  assert (len(ds), ds.num_classes, ds.image_shape) == (12, 3, (16, 16, 3))
  batch = next(ds.train_batches(4, seed=0))
  assert batch['image'].dtype == np.uint8
  assert batch['image'].shape == (4, 16, 16, 3)
  records = _record_of(batch['image'])
  np.testing.assert_array_equal(batch['orig_size'], [SIZES[r] for r in records])
  np.testing.assert_array_equal(batch['label'], records % 3)
  # The whole ramp is squeezed into the canvas: at canvas pixel centre j the
  # source coordinate is (j + 0.5) * w / 16 - 0.5 and the red value is
  # 240 * x / (w - 1). Away from the borders (where resampling clamps), the
  # canvas matches within rounding; a central crop would not.
  for image, record in zip(batch['image'], records, strict=True):
    h, w = SIZES[record]
    j = np.arange(3, 13)
    expect_x = 240 * ((j + 0.5) * w / 16 - 0.5) / (w - 1)
    expect_y = 240 * ((j + 0.5) * h / 16 - 0.5) / (h - 1)
    np.testing.assert_allclose(image[8, j, 0], expect_x, atol=1.5)
    np.testing.assert_allclose(image[j, 8, 1], expect_y, atol=1.5)


def test_stream_is_a_function_of_seed_and_step(ramp_dir, generated):
  ds = data.get_dataset(_cfg(ramp_dir))
  it = ds.train_batches(4, seed=5)
  stream = np.concatenate([_record_of(next(it)['image']) for _ in range(9)])
  # By definition: position q reads perm_(q // 12)[q % 12].
  expected = generated[
    np.concatenate([indexed.epoch_permutation(5, e, 12) for e in range(3)])
  ]
  np.testing.assert_array_equal(stream, expected)
  assert list(stream[:12]) != list(stream[12:24])  # epochs differ

  # Resuming at step 7 (third epoch) reads exactly one batch: no skipped
  # record is read or decoded.
  resumed = data.get_dataset(_cfg(ramp_dir))
  first = next(resumed.train_batches(4, seed=5, start_step=7))
  np.testing.assert_array_equal(_record_of(first['image']), stream[28:32])
  assert resumed.records_read == 4

  # Two processes split every global batch into the same images.
  p0 = data.get_dataset(_cfg(ramp_dir)).train_batches(
    4, seed=5, start_step=7, process_index=0, process_count=2
  )
  p1 = data.get_dataset(_cfg(ramp_dir)).train_batches(
    4, seed=5, start_step=7, process_index=1, process_count=2
  )
  both = np.concatenate([next(p0)['image'], next(p1)['image']])
  np.testing.assert_array_equal(both, first['image'])


def test_eval_is_resize_small_then_central_crop(ramp_dir):
  ds = data.get_dataset(_cfg(ramp_dir, 'test', image_size=8, resize_size=10))
  batches = list(ds.eval_batches(4))
  assert [int(b['mask'].sum()) for b in batches] == [4, 1]
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  index = _record_of(images)
  assert sorted(index) == [0, 1, 2, 3, 4]
  np.testing.assert_array_equal(labels, index % 3)
  # Image 3 is 36x60: shorter side 36 -> 10, so 60 -> 16.67 -> 17 wide; the
  # central 8x8 starts at row 1, column 4. Red at output column c is the
  # ramp at source x = (4 + c + 0.5) * 60 / 17 - 0.5.
  c = np.arange(8)
  expect = 240 * ((4 + c + 0.5) * 60 / 17 - 0.5) / 59
  np.testing.assert_allclose(images[index == 3][0, 4, :, 0], expect, atol=2)
  # Two processes: the same number of batches, masks cover the split once.
  parts = [
    list(ds.eval_batches(4, process_index=k, process_count=2)) for k in range(2)
  ]
  assert [len(p) for p in parts] == [2, 2]
  masks = [b['mask'].sum() for p in parts for b in p]
  assert sum(masks) == 5


def test_not_prepared_or_wrong_format_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build ramp_images'):
    data.get_dataset(_cfg(str(tmp_path)))
  RampImages(data_dir=str(tmp_path)).download_and_prepare()  # TFRecord
  with pytest.raises(ValueError, match='array_record'):
    data.get_dataset(_cfg(str(tmp_path)))


def test_mini_imagenet_has_the_real_builders_name_and_features(tmp_path):
  mini.prepare('imagenet2012', str(tmp_path), splits={'train': 6})
  builder = tfds.builder('imagenet2012', data_dir=str(tmp_path))
  assert builder.info.splits['train'].num_examples == 6
  assert builder.info.features['label'].num_classes == 1000
  source = tfds.data_source(
    'imagenet2012', split='train', data_dir=str(tmp_path), download=False,
    decoders={'image': tfds.decode.SkipDecoding()},
  )  # fmt: skip
  encoded = source[0]['image']
  image = Image.open(io.BytesIO(encoded))
  assert image.format == 'JPEG'
  assert mini.SIDE_RANGE[0] <= min(image.size) < mini.SIDE_RANGE[1]


def test_unreadable_record_is_replaced_by_the_next_and_logged_once(
  ramp_dir, generated, caplog
):
  ds = data.get_dataset(_cfg(ramp_dir))
  original = ds._load
  ds._load = lambda i: (b'not an image', 0) if i == 4 else original(i)
  with caplog.at_level(logging.WARNING):
    it = ds.train_batches(12, seed=0, shuffle=False)
    first, second = next(it), next(it)
  for batch in (first, second):
    np.testing.assert_array_equal(
      _record_of(batch['image']), generated[[0, 1, 2, 3, 5, 5, 6, 7, 8, 9,
                                             10, 11]]
    )  # fmt: skip
  assert ds.num_skipped == 1
  assert sum('record 4' in r.message for r in caplog.records) == 1
