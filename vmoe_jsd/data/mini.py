"""Offline mini copies of tfds datasets, for `:runlocal` runs and tests.

`prepare(name, data_dir)` writes, with tfds's own builder machinery, a
small dataset under the REAL builder's name, version and features (so
`tfds.builder(name, data_dir=...)` and `tfds.data_source` read it exactly
as they would read the real one) in the ArrayRecord format. Images have
varied sizes and aspect ratios (ImageNet-shaped: JPEG, 40-96 px a side) or
the builder's fixed shape (CIFAR: 32x32 PNG); each image is a smooth colour
gradient whose hue depends on its label, plus noise, so a tiny model can
learn something. Nothing is downloaded.

The first preparation prints one line; what tfds and TensorFlow write
meanwhile (tqdm bars with raw escape codes, "Downloading and preparing",
absl warnings, C++ banners) is kept in a temporary file and shown only if
the preparation fails (issue 16).

`import_tfds()` is how the project imports tensorflow_datasets: it also
stops tfds leaving an empty `tmp*tfds` folder in the temp directory for
every builder of a dataset that is not prepared (issue 24).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import numpy as np

SPLITS = {'train': 96, 'validation': 32, 'test': 32}
SIDE_RANGE = (40, 96)


def import_tfds():
  """tensorflow_datasets (slow to import: only when a tfds dataset is used),
  with its temp-folder leak stopped.

  tfds (4.9) initialises every builder of a dataset not prepared in its
  data_dir with `DatasetInfo.initialize_from_bucket`, which makes a
  temporary folder before it asks GCS for the dataset's info files and
  never removes it; with GCS off (tfds's default) there is nothing to copy,
  so each such builder (`num_classes`, a mini dataset's first preparation,
  a test's builder) left an empty `tmp*tfds` folder behind. The method is
  wrapped once so that it runs only when GCS has files for the dataset.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415 - optional, heavy
  from tensorflow_datasets.core.utils import gcs_utils  # noqa: PLC0415

  info_cls = tfds.core.DatasetInfo
  original = info_cls.initialize_from_bucket
  if not getattr(original, 'only_with_gcs_files', False):

    def initialize_from_bucket(self):
      if gcs_utils.gcs_dataset_info_files(self.full_name):
        original(self)

    initialize_from_bucket.only_with_gcs_files = True
    initialize_from_bucket.__wrapped__ = original
    info_cls.initialize_from_bucket = initialize_from_bucket
  return tfds


def _fake_image(rng, shape, label: int, num_classes: int) -> np.ndarray:
  height, width, channels = shape
  if height is None or width is None:
    height, width = (int(x) for x in rng.integers(*SIDE_RANGE, size=2))
  channels = channels or 3
  y = np.linspace(0.0, 1.0, height)[:, None, None]
  x = np.linspace(0.0, 1.0, width)[None, :, None]
  phase = 2 * np.pi * label / max(num_classes, 1)
  colour = 0.5 + 0.5 * np.cos(phase + np.arange(channels) * 2.1)
  image = 255 * (0.6 * colour * (0.5 + 0.5 * x) + 0.3 * y)
  image = image + rng.normal(0, 12, (height, width, channels))
  return np.clip(image, 0, 255).astype(np.uint8)


def _fake_example(features, rng, index: int) -> dict:
  tfds = import_tfds()
  out = {}
  labels = {
    key: f
    for key, f in features.items()
    if isinstance(f, tfds.features.ClassLabel)
  }
  # The image's hue follows 'label' (or the first class label).
  main = labels.get('label') or next(iter(labels.values()), None)
  num_classes = main.num_classes if main else 1
  label = int(rng.integers(num_classes))
  for key, feature in features.items():
    if feature is main:
      out[key] = label
    elif isinstance(feature, tfds.features.ClassLabel):
      out[key] = int(rng.integers(feature.num_classes))
    elif isinstance(feature, tfds.features.Image):
      out[key] = _fake_image(rng, feature.shape, label, num_classes)
    elif isinstance(feature, tfds.features.Text):
      out[key] = f'mini_{index:06d}'
    elif isinstance(feature, tfds.features.Tensor):
      out[key] = np.zeros(feature.shape, feature.np_dtype)
    else:
      raise NotImplementedError(
        f'mini datasets do not fake {type(feature).__name__} features '
        f'(feature {key!r})'
      )
  return out


def prepare(name: str, data_dir: str, splits: dict | None = None):
  """Prepares the mini `name` in `data_dir` unless it is already there.

  Args:
    name: a registered tfds dataset name, e.g. 'imagenet2012'.
    data_dir: tfds data dir to write into.
    splits: split name -> number of examples (default SPLITS).

  Returns:
    The builder of the prepared dataset.
  """
  tfds = import_tfds()
  real = tfds.builder_cls(name)
  splits = dict(splits or SPLITS)

  class Mini(real, skip_registration=True):
    """The real builder's info with generated examples."""

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate(split, n) for split, n in splits.items()}

    def _generate(self, split, n):
      rng = np.random.default_rng(list(split.encode()))
      features = self.info.features
      for i in range(n):
        yield i, _fake_example(features, rng, i)

  Mini.name = real.name
  # tfds looks for a checksums file beside a builder's package and, for a
  # dotted module name, imports `importlib_resources` (undeclared, absent
  # here) to do so. A mini dataset downloads nothing: a bare module name
  # skips that lookup.
  Mini.__module__ = 'vmoe_jsd_mini'
  with captured_output():
    builder = Mini(data_dir=data_dir, file_format='array_record')
    prepared = builder.is_prepared()
  if not prepared:
    print(
      f'Preparing an offline mini {name} ({sum(splits.values())} generated '
      f'images, splits {splits}) in {data_dir} (first use only).',
      flush=True,
    )
    with captured_output():
      builder.download_and_prepare()
  return builder


@contextlib.contextmanager
def redirected(target_fd: int, fds=(1, 2)):
  """File descriptors `fds` (Python, C++ and child processes alike) write to
  `target_fd` inside the block."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(fd) for fd in fds]
  for fd in fds:
    os.dup2(target_fd, fd)
  try:
    yield
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip(fds, saved, strict=True):
      os.dup2(copy, fd)
      os.close(copy)


@contextlib.contextmanager
def captured_output():
  """File descriptors 1 and 2 go to a temporary file, written to stderr
  only if the block raises."""
  with tempfile.TemporaryFile() as log:
    try:
      with redirected(log.fileno()):
        yield
    except BaseException:
      log.seek(0)
      sys.stderr.write(log.read().decode(errors='replace'))
      sys.stderr.flush()
      raise
