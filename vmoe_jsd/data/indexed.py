"""Index-based, deterministic input pipeline over random-access sources.

Which example fills which slot of which batch is a pure function of
(seed, step): example position `q = step * B + j` of the global stream
(B = global batch, j in [0, B)) reads record `perm_e[q mod N]` of epoch
`e = q // N`, where `perm_e` is a seeded permutation of the N records.
Process k of P takes slots `[k B/P, (k+1) B/P)` of each global batch, so the
global batch does not depend on P, and resuming at step s reads exactly the
records of batch s: restoring the position costs one permutation (O(N)
integers, independent of s) and no skipped record is read or decoded
(issue 7, item 5). The iterator state is the step, already in the checkpoint,
so nothing is saved beside it; this needs no new dependency (grain's index
sampler would do the same with its own state to checkpoint).

Training images follow vmoe's `decode_jpeg_and_inception_crop`: the crop is
sampled on the whole image (augment/, on device). The host decodes every
image, records its original (height, width) and resizes the WHOLE image
(aspect ratio not kept, antialiased) into a square `canvas` x `canvas`
uint8 array; the device composes the canvas scaling into each view's
affine, so crop area and aspect ratio hold in original pixels.

Canvas side, measured (benchmarks/README.md, `benchmarks/input_pipeline.py`
on 500x375 photos): 320 px (307 kB per RGB image) is the default for 224 px
views. Evaluation images are `resize_small(resize) | central_crop(size)` on
the host, as vmoe's `resize_small(256)|central_crop(224)`.

Host memory: the current epoch's permutation (4 bytes per record; 5 MB for
ImageNet-1k) plus the batches in flight (local batch x canvas^2 x C bytes
each; `data.prefetch` holds two).
"""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator

import numpy as np

from vmoe_jsd.data import eval_padding

CHANNEL_MODES = {1: 'L', 3: 'RGB'}


class DataError(ValueError):
  """Input data that cannot be used as a whole (a truncated, mismatched or
  wrongly formatted file): one line naming the file and what is wrong.
  Commands end with it on stderr and exit status 2 (cli.failure_line)."""


class UnreadableRecord(Exception):
  """Raised by a dataset's `_load` for a record it cannot read (skipped like
  an undecodable one, in the decode handlers below)."""


def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
  """The seeded order of the N records in one epoch (each epoch has its
  own): an (N,) int32 (int64 past 2^31 records) permutation of range(N)."""
  rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
  dtype = np.int32 if num_records < 2**31 else np.int64
  return rng.permutation(num_records).astype(dtype)


class IndexSampler:
  """Maps (step, slot) of the global training stream to record indices.

  Attributes:
    num_records: records in the split (N).
    seed: shuffle seed.
    shuffle: permute each epoch (False: records in order, for tests).
    permutation: (seed, epoch, N) -> the epoch's order (epoch_permutation;
      the in-memory datasets keep their own).
  """

  def __init__(
    self,
    num_records: int,
    seed: int,
    shuffle: bool = True,
    permutation: Callable = epoch_permutation,
  ):
    if num_records <= 0:
      raise ValueError(f'num_records={num_records} must be > 0')
    self.num_records = num_records
    self.seed = seed
    self.shuffle = shuffle
    self.permutation = permutation
    self._epoch = None
    self._perm = None

  def _order(self, epoch: int) -> np.ndarray:
    if self._epoch != epoch:
      self._perm = (
        self.permutation(self.seed, epoch, self.num_records)
        if self.shuffle
        else np.arange(self.num_records)
      )
      self._epoch = epoch
    return self._perm

  def indices(self, step: int, batch_size: int, start: int, stop: int):
    """(stop - start,) int64 record indices of slots [start, stop) of the
    global batch `step` of `batch_size` B (0-based: the batch used by step
    `step + 1`; a process's share starts at k B / P)."""
    positions = step * batch_size + np.arange(start, stop, dtype=np.int64)
    epochs, within = np.divmod(positions, self.num_records)
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):  # one, or two at an epoch boundary
      here = epochs == epoch
      out[here] = self._order(int(epoch))[within[here]]
    return out


class IndexedBatches:
  """The batches of a dataset read by index, the same on every process
  count: training batches are a function of (seed, step) (IndexSampler),
  evaluation batches of the split size (eval_padding.py).

  Subclasses have `__len__`, `_train_batch(indices) -> batch` and
  `_eval_batch(positions, valid) -> batch`; they may set `permutation` (an
  IndexSampler order; default epoch_permutation).
  """

  permutation = staticmethod(epoch_permutation)

  def train_batches(
    self,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of every global batch from `start_step` on
    (slots [k B/P, (k+1) B/P) of each global batch of B).

    Args:
      batch_size: global batch B (images), a multiple of process_count.
      seed: shuffle seed.
      start_step: first batch to produce (resume position).
      process_index: this process, k.
      process_count: number of processes, P.
      shuffle: permute records every epoch.

    Yields:
      {'image': (b, H, W, C) uint8, 'label': (b,) int32}, b the local
      batch; the canvas datasets (IndexedDataset) add 'orig_size': (b, 2)
      int32 original (height, width).
    """
    if batch_size % process_count:
      raise ValueError(
        f'batch_size={batch_size} must be a multiple of process_count='
        f'{process_count}'
      )
    local = batch_size // process_count
    start = process_index * local
    sampler = IndexSampler(len(self), seed, shuffle, self.permutation)
    for step in itertools.count(start_step):
      indices = sampler.indices(step, batch_size, start, start + local)
      yield self._train_batch(indices)

  def eval_batches(
    self,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """The split once, in order, padded to full batches with a 'mask'.

    Every process yields the same number of batches, ceil(total / B) from
    the split size (global batch b holds positions [b B, (b+1) B), each
    process its contiguous B / process_count of them; `limit`: the first
    `limit` positions only). Padding (and unreadable records) are masked
    out, so every batch has the same shape. 'index' is each example's
    position in the split (-1 for padding), which keys its random views.

    Yields:
      {'image', 'label', 'mask' (bool), 'index' (int32)} of B /
      process_count examples.
    """
    total = eval_padding.eval_total(len(self), limit)
    num_batches = eval_padding.num_eval_steps(total, batch_size, process_count)
    local = batch_size // process_count
    for b in range(num_batches):
      first = b * batch_size + process_index * local
      positions = np.arange(first, first + local)
      yield self._eval_batch(positions, positions < total)


def _as_array(image, channels: int) -> np.ndarray:
  array = np.asarray(image, dtype=np.uint8)
  if array.ndim == 2:
    array = array[:, :, None]
  return array.reshape(*array.shape[:2], channels)


def to_canvas(data, canvas: int, channels: int):
  """Decodes an image and resizes the whole of it to canvas x canvas.

  Args:
    data: encoded image bytes (JPEG, PNG, ...) or a file path.
    canvas: side of the square output.
    channels: 1 or 3.

  Returns:
    ((canvas, canvas, channels) uint8, (height, width) of the original).
  """
  from PIL import Image  # noqa: PLC0415 - optional: image datasets only

  raw = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
  width, height = raw.size
  # JPEG: decode at the smallest 1/2^k scale still >= canvas on both sides.
  raw.draft(CHANNEL_MODES[channels], (canvas, canvas))
  image = decode_image_from(raw, channels)
  if image.size != (canvas, canvas):
    image = image.resize((canvas, canvas), Image.BILINEAR)
  return _as_array(image, channels), (height, width)


def decode_image_from(raw, channels: int):
  """Decodes an opened (not yet loaded) PIL image, in mode 'L' (channels
  1) or 'RGB' (3); grey, palette, RGBA and CMYK images are converted, alpha
  is dropped."""
  raw.load()
  mode = CHANNEL_MODES[channels]
  if raw.mode == mode:
    return raw
  if raw.mode in ('RGBA', 'LA', 'P', 'PA') and mode == 'RGB':
    return raw.convert('RGBA').convert('RGB')
  return raw.convert(mode)


def resize_small_central_crop(
  data, resize: int | None, size: int, channels: int
) -> np.ndarray:
  """vmoe's evaluation inputs: `resize_small(resize) | central_crop(size)`.

  Args:
    data: encoded image bytes or a file path.
    resize: the shorter side before the central crop; None: the whole
      image resized to size x size (vmoe's `resize(size)`).
    size: output side.
    channels: 1 or 3.

  Returns:
    (size, size, channels) uint8.
  """
  from PIL import Image  # noqa: PLC0415 - optional: image datasets only

  if resize is None:
    return to_canvas(data, size, channels)[0]
  raw = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
  width, height = raw.size
  scale = resize / min(height, width)
  new_w = max(size, round(width * scale))
  new_h = max(size, round(height * scale))
  raw.draft(CHANNEL_MODES[channels], (new_w, new_h))
  image = decode_image_from(raw, channels)
  image = image.resize((new_w, new_h), Image.BILINEAR)
  top = (new_h - size) // 2
  left = (new_w - size) // 2
  image = image.crop((left, top, left + size, top + size))
  return _as_array(image, channels)


class IndexedDataset(IndexedBatches):
  """Base of the random-access datasets (tfds ArrayRecord, image folders).

  Subclasses set `name`, `num_classes`, `channels`, `image_size` (canvas
  side for training, output side for evaluation), `resize_size` (see
  `resize_small_central_crop`) and
  `_num_records`, and implement `_load(index) -> (encoded, label)`, which
  raises UnreadableRecord for a record to skip.
  `records_read` counts `_load` calls (tests check that resuming reads one
  batch, not the stream before it).
  """

  name: str
  num_classes: int
  channels: int
  image_size: int
  resize_size: int | None = None
  num_workers: int | None = None
  _num_records: int

  def _load(self, index: int):
    raise NotImplementedError

  def __len__(self) -> int:
    return self._num_records

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def _count_read(self):
    with self._lock:
      self.records_read += 1

  def _init_reader(self):
    self.records_read = 0
    self._lock = threading.Lock()
    self._bad: dict[int, str] = {}
    workers = self.num_workers or min(16, os.cpu_count() or 1)
    self._pool = concurrent.futures.ThreadPoolExecutor(workers)

  def _decode(self, index: int, decode: Callable):
    """(decode(encoded image), label) of record `index`, or None if it is
    unreadable (skipped)."""
    try:
      encoded, label = self._load(index)
    except UnreadableRecord as e:
      self._skip(index, e)
      return None
    self._count_read()
    try:
      return decode(encoded), label
    except Exception as e:  # noqa: BLE001 - any decoder failure: skip it.
      self._skip(index, e)
      return None

  def _decode_train(self, index: int):
    """((canvas, (h, w)), label) of record `index`, or None."""
    return self._decode(
      index, lambda d: to_canvas(d, self.image_size, self.channels)
    )

  def _skip(self, index: int, error: Exception) -> None:
    with self._lock:
      first = index not in self._bad
      self._bad[index] = f'{type(error).__name__}: {error}'
    if first:
      logging.warning(
        '%s: skipping unreadable image %s (%s); %d skipped so far',
        self.name,
        self.describe(index),
        self._bad[index],
        len(self._bad),
      )

  def describe(self, index: int) -> str:
    """A name for record `index` in log messages."""
    return f'record {index}'

  @property
  def num_skipped(self) -> int:
    """Distinct unreadable records met so far."""
    return len(self._bad)

  def _train_example(self, index: int):
    # An unreadable record is replaced by the next readable one in record
    # order: deterministic, so batches stay a function of (seed, step).
    for offset in range(self._num_records):
      out = self._decode_train((index + offset) % self._num_records)
      if out is not None:
        return out
    first = min(self._bad)
    why = re.sub(r' <_io\.BytesIO object at \w+>', '', self._bad[first])
    raise DataError(
      f'{self.name}: no readable image in the split ({len(self._bad)} '
      f'unreadable; e.g. {self.describe(first)}: {why}); '
      'expected image files (JPEG, PNG, GIF, ...) that PIL can decode'
    )

  def _train_batch(self, indices) -> dict[str, np.ndarray]:
    examples = list(self._pool.map(self._train_example, indices))
    return {
      'image': np.stack([image for (image, _), _ in examples]),
      'label': np.asarray([label for _, label in examples], np.int32),
      'orig_size': np.asarray([hw for (_, hw), _ in examples], np.int32),
    }

  def _decode_eval(self, index: int):
    """(image, label) of record `index`, or None."""
    return self._decode(
      index,
      lambda d: resize_small_central_crop(
        d, self.resize_size, self.image_size, self.channels
      ),
    )

  def _eval_batch(self, positions, valid) -> dict[str, np.ndarray]:
    indices = [int(i) for i in positions[valid]]
    examples = list(self._pool.map(self._decode_eval, indices))
    examples += [None] * (len(positions) - len(examples))
    blank = np.zeros(self.image_shape, np.uint8)
    padding = [-1] * (len(positions) - len(indices))
    return {
      'image': np.stack([blank if e is None else e[0] for e in examples]),
      'label': np.asarray(
        [0 if e is None else e[1] for e in examples], np.int32
      ),
      'mask': np.asarray([e is not None for e in examples]),
      'index': np.asarray(indices + padding, np.int32),
    }
