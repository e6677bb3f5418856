"""The tf.data pipeline on a real (tiny) tfds dataset prepared offline."""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from vmoe_jsd import data  # noqa: E402


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """12 train / 5 test images of varying sizes; label = first pixel % 3."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=3),
      })
    )  # fmt: skip

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      'train': self._generate_examples(12, 0),
      'test': self._generate_examples(5, 1),
    }

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = rng.integers(10, 30, size=2)
      image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
      yield i, {'image': image, 'label': int(image[0, 0, 0]) % 3}


def test_tfds_train_and_eval_batches(tmp_path):
  TinyImages(data_dir=str(tmp_path)).download_and_prepare()
  cfg = {
    'name': 'tfds',
    'tfds_name': 'tiny_images',
    'split': 'train',
    'image_size': 16,
    'data_dir': str(tmp_path),
    'shuffle_buffer': 4,
  }
  ds = data.get_dataset(cfg)
  assert (len(ds), ds.num_classes, ds.image_shape) == (12, 3, (16, 16, 3))
  it = ds.train_batches(4, seed=0)
  first = [next(it) for _ in range(3)]  # 12 images: one epoch
  assert all(b['image'].shape == (4, 16, 16, 3) for b in first)
  assert first[0]['image'].dtype == np.uint8
  # Resuming at step 2 gives batch 2 of the same deterministic stream.
  resumed = next(ds.train_batches(4, seed=0, start_step=2))
  np.testing.assert_array_equal(resumed['label'], first[2]['label'])
  test = data.get_dataset({**cfg, 'split': 'test'})
  batches = list(test.eval_batches(4))
  assert [int(b['mask'].sum()) for b in batches] == [4, 1]
  assert all(b['image'].shape == (4, 16, 16, 3) for b in batches)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build tiny_images'):
    data.get_dataset({'name': 'tfds', 'tfds_name': 'tiny_images',
                      'split': 'train', 'image_size': 8,
                      'data_dir': str(tmp_path)})  # fmt: skip
