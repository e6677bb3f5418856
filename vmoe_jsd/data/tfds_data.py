"""TensorFlow Datasets through tf.data (ImageNet-size data, needs TensorFlow).

The host decodes each image, resizes its shorter side to `resize_size`
(default: `image_size`) and takes the central `image_size` square
(`resize_small` + `central_crop`), then batches uint8 images. Random crops,
flips and colour jitter run on device, inside the train step (see
augment.py), so they are sampled within that square.

Every process reads its own part of the split (tfds.even_splits), shuffles
with a fixed seed and skips `start_step` batches on resume, so a resumed run
continues the same deterministic stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def _tf():
  try:
    import tensorflow as tf  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
      "dataset name 'tfds' needs TensorFlow: pip install tensorflow-cpu"
    ) from e
  tf.config.set_visible_devices([], 'GPU')
  return tf


class TfdsDataset:
  """A tfds image classification split as a stream of numpy batches.

  Attributes:
    tfds_name: e.g. 'imagenet2012', 'cifar10', 'fashion_mnist'.
    split: tfds split string, e.g. 'train[:99%]'.
    image_size: host working size (square): the central image_size square
      after the shorter side is resized to resize_size.
    resize_size: shorter side before the central crop (default image_size;
      vmoe evaluates ImageNet with 256 then a central 224 crop).
    data_dir: tfds data dir.
    shuffle_buffer: examples in the shuffle buffer.
  """

  def __init__(
    self,
    tfds_name: str,
    split: str,
    image_size: int,
    data_dir: str | None = None,
    shuffle_buffer: int = 10_000,
    image_key: str = 'image',
    label_key: str = 'label',
    resize_size: int | None = None,
  ):
    import tensorflow_datasets as tfds  # noqa: PLC0415

    self.tfds_name = tfds_name
    self.split = split
    self.image_size = image_size
    self.resize_size = resize_size or image_size
    if self.resize_size < image_size:
      raise ValueError(
        f'resize_size={resize_size} must be >= image_size={image_size}'
      )
    self.shuffle_buffer = shuffle_buffer
    self.image_key = image_key
    self.label_key = label_key
    self.name = f'tfds:{tfds_name}:{split}'
    self._builder = tfds.builder(tfds_name, data_dir=data_dir)
    info = self._builder.info
    if not info.splits:
      raise FileNotFoundError(
        f'tfds dataset {tfds_name!r} is not prepared in data_dir='
        f'{data_dir or tfds.core.constants.DATA_DIR!r}. Prepare it first '
        f'(`tfds build {tfds_name} --data_dir=...`; ImageNet needs its '
        'archives in the manual_dir), or set config.dataset.<split>.data_dir.'
      )
    self.num_classes = info.features[label_key].num_classes
    self.num_examples = info.splits[split].num_examples
    channels = info.features[image_key].shape[-1] or 3
    self.image_shape = (image_size, image_size, channels)

  def __len__(self) -> int:
    return self.num_examples

  def _read(self, process_index, process_count, shuffle, seed):
    import tensorflow_datasets as tfds  # noqa: PLC0415

    tf = _tf()
    split = tfds.even_splits(self.split, n=process_count)[process_index]
    ds = self._builder.as_dataset(
      split=split,
      shuffle_files=shuffle,
      read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    size = self.image_size
    resize = self.resize_size

    def prepare(example):
      image = example[self.image_key]
      h = tf.cast(tf.shape(image)[0], tf.float32)
      w = tf.cast(tf.shape(image)[1], tf.float32)
      scale = resize / tf.minimum(h, w)
      new_hw = tf.cast(tf.math.ceil(tf.stack([h, w]) * scale), tf.int32)
      image = tf.image.resize(image, new_hw, antialias=True)
      image = tf.image.resize_with_crop_or_pad(image, size, size)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      return {'image': image, 'label': tf.cast(example[self.label_key],
                                                tf.int32)}  # fmt: skip

    return ds, prepare

  def train_batches(
    self,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of every global training batch, forever."""
    tf = _tf()
    ds, prepare = self._read(process_index, process_count, True, seed)
    ds = ds.repeat().shuffle(self.shuffle_buffer, seed=seed)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    ds = ds.skip(start_step).prefetch(tf.data.AUTOTUNE)
    yield from ds.as_numpy_iterator()

  def eval_batches(
    self,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """The split once, padded to full batches with a 'mask'."""
    tf = _tf()
    ds, prepare = self._read(process_index, process_count, False, 0)
    if limit is not None:
      ds = ds.take(limit // process_count)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    local = batch_size // process_count
    for batch in ds.batch(local).prefetch(2).as_numpy_iterator():
      n = len(batch['label'])
      pad = local - n
      mask = np.arange(local) < n
      yield {
        'image': np.concatenate([batch['image'],
                                 np.repeat(batch['image'][:1], pad, 0)]),
        'label': np.concatenate([batch['label'],
                                 np.repeat(batch['label'][:1], pad, 0)]),
        'mask': mask,
      }  # fmt: skip
