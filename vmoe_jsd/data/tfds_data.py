"""TensorFlow Datasets splits read by index (tfds.data_source, ArrayRecord).

Random access to the prepared ArrayRecord files (`tfds.data_source`) under
the deterministic index pipeline of `indexed.py`: training batches are
whole images resized to a square canvas plus their original size (the
device samples vmoe's inception crop in original-image coordinates),
evaluation batches are `resize_small(resize_size) | central_crop(size)`
(or, without resize_size, the whole image resized to size x size).
Resuming at step s reads only batch s.

Datasets must be prepared in the ArrayRecord format (`tfds build NAME
--file_format=array_record`); a TFRecord copy can be converted with
`tfds convert_format` (needs apache-beam).

`mini=True` prepares, when data_dir holds nothing, an offline mini dataset
with the real builder's name, version and features (`mini.py`): the
`:runlocal` configs use it to run the real path without the data.
"""

from __future__ import annotations

import os
import tempfile

from vmoe_jsd.data import indexed
from vmoe_jsd.data import mini as mini_lib

DEFAULT_MINI_DIR = os.path.join(tempfile.gettempdir(), 'vmoe_jsd_mini_tfds')


def num_classes(
  tfds_name: str,
  data_dir: str | None,
  *,
  mini: bool = False,
  label_key: str = 'label',
) -> int:
  """Classes of a tfds dataset's label, from its builder's info (the
  prepared copy's dataset_info.json, or the builder's code when none is
  prepared: nothing is read or downloaded)."""
  tfds = mini_lib.import_tfds()
  if mini:
    data_dir = data_dir or DEFAULT_MINI_DIR
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  return builder.info.features[label_key].num_classes


class TfdsDataset(indexed.IndexedDataset):
  """A tfds image classification split with random access.

  Attributes:
    tfds_name: e.g. 'imagenet2012', 'cifar10', 'oxford_flowers102'.
    split: tfds split string, e.g. 'train[:99%]'.
    image_size: training: the canvas side; evaluation: the output side.
    resize_size: evaluation only: shorter side before the central crop
      (None: the whole image resized to image_size).
    data_dir: tfds data dir.
  """

  def __init__(
    self,
    tfds_name: str,
    split: str,
    image_size: int,
    data_dir: str | None = None,
    resize_size: int | None = None,
    image_key: str = 'image',
    label_key: str = 'label',
    mini: bool = False,
    num_workers: int | None = None,
  ):
    # TensorFlow Datasets only when a tfds dataset is used (slow to import).
    tfds = mini_lib.import_tfds()
    if mini:
      data_dir = data_dir or DEFAULT_MINI_DIR
      mini_lib.prepare(tfds_name, data_dir)
    self.tfds_name = tfds_name
    self.split = split
    self.image_size = image_size
    self.resize_size = resize_size
    if resize_size is not None and resize_size < image_size:
      raise ValueError(
        f'resize_size={resize_size} must be >= image_size={image_size}'
      )
    self.image_key = image_key
    self.label_key = label_key
    self.num_workers = num_workers
    self.name = f'tfds:{tfds_name}:{split}'
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    info = builder.info
    where = data_dir or tfds.core.constants.DATA_DIR
    if not info.splits:
      raise FileNotFoundError(
        f'tfds dataset {tfds_name!r} is not prepared in data_dir={where!r}. '
        f'Prepare it first (`tfds build {tfds_name} --data_dir=... '
        '--file_format=array_record`; ImageNet needs its archives in the '
        'manual_dir), or set config.dataset.<split>.data_dir.'
      )
    if str(info.file_format).split('.')[-1].lower() != 'array_record':
      raise ValueError(
        f'tfds dataset {tfds_name!r} in {where!r} is stored as '
        f'{info.file_format}; random access needs ArrayRecord: prepare it '
        f'with `tfds build {tfds_name} --file_format=array_record` or convert'
        f' it with `tfds convert_format --dataset_dir={builder.data_dir} '
        '--out_file_format=array_record` (needs apache-beam).'
      )
    self.num_classes = info.features[label_key].num_classes
    self.channels = info.features[image_key].shape[-1] or 3
    self._source = tfds.data_source(
      tfds_name,
      split=split,
      data_dir=data_dir,
      download=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
    )
    self._num_records = len(self._source)
    self._init_reader()

  def _load(self, index: int):
    record = self._source[int(index)]
    return record[self.image_key], int(record[self.label_key])
