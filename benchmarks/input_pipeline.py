r"""Host input pipeline: canvas-size quality and decode throughput at 224 px.

  python benchmarks/input_pipeline.py --photos_dir=DIR [--num_images=400]

DIR holds colour photos (any size; e.g. scikit-image's `skimage/data`
astronaut.png, chelsea.png, coffee.png, motorcycle_left.png, rocket.jpg,
...). From them the script makes `num_images` ImageNet-like JPEGs
(500x375 or 375x500, quality 90, random crops and flips of the photos;
mean ~ImageNet's 110 kB) and:

1. Canvas size (quality vs bytes): for random inception crops (area 5-100%
   of the image, aspect 3/4-4/3, vmoe's `decode_jpeg_and_inception_crop`)
   it compares a 224x224 view rendered bilinearly (no antialiasing, as
   augment/ renders on device) from an S x S canvas of the whole image
   (data/indexed.py) with the ideal view (antialiased resampling of the
   original crop); vmoe's own view (crop of the original, bilinear resize
   without antialiasing, as tf.image.resize) is scored the same way.
   Reports PSNR (dB) per canvas side S and bytes per image sent to the
   device.
2. Throughput: the training pipeline of data/tfds_data.py on a tfds
   ArrayRecord copy of the JPEGs (read, decode, resize to the canvas,
   batch) with 1 and 2 decoding threads: images/s.
"""

import io
import os
import resource
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from vmoe_jsd import cli
from vmoe_jsd.data import indexed, mini, tfds_data

tfds = mini.import_tfds()  # No empty tmp*tfds folder per builder made.
tfds.disable_progress_bar()  # No tqdm bars on the console while preparing.

_PHOTOS = flags.DEFINE_string('photos_dir', None, 'folder of colour photos')
_NUM = flags.DEFINE_integer('num_images', 400, 'JPEGs to make', lower_bound=1)
_CROPS = flags.DEFINE_integer(
  'crops', 200, 'random crops for the quality', lower_bound=1
)
_CANVASES = flags.DEFINE_list(
  'canvases', ['224', '256', '288', '320', '384', '448'], 'canvas sides'
)
_BATCHES = flags.DEFINE_integer(
  'batches', 6, 'timed batches of 64', lower_bound=1
)


def make_jpegs(photos_dir, num, seed=0):
  """ImageNet-like JPEGs: 500x375 / 375x500 crops of the photos.

  Returns:
    (JPEG bytes, the uint8 pixels each was encoded from).
  """
  rng = np.random.default_rng(seed)
  photos = []
  for name in sorted(os.listdir(photos_dir)):
    try:
      image = Image.open(os.path.join(photos_dir, name)).convert('RGB')
    except Exception:  # noqa: BLE001 - not an image
      continue
    if min(image.size) >= 256:
      photos.append(image)
  out, sources = [], []
  for i in range(num):
    photo = photos[i % len(photos)]
    w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
    scale = rng.uniform(0.6, 1.0) * min(photo.size[0] / w, photo.size[1] / h)
    cw, ch = int(w * scale), int(h * scale)
    x = rng.integers(0, photo.size[0] - cw + 1)
    y = rng.integers(0, photo.size[1] - ch + 1)
    image = photo.resize((w, h), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    # Sensor-like noise brings the JPEG sizes to ImageNet's (~110 kB).
    pixels = np.asarray(image, np.float64) + rng.normal(0, 8, (h, w, 3))
    pixels = np.clip(pixels.round(), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, 'JPEG', quality=90)
    out.append(buf.getvalue())
    sources.append(pixels)
  return out, sources


def bilinear(image, box, size):
  """size x size view of box=(x0, y0, x1, y1) in `image` (float), bilinear
  at pixel centres with edge clamping and no antialiasing."""
  x0, y0, x1, y1 = box
  h, w = image.shape[:2]
  ys = y0 + (np.arange(size) + 0.5) * (y1 - y0) / size - 0.5
  xs = x0 + (np.arange(size) + 0.5) * (x1 - x0) / size - 0.5
  ys = np.clip(ys, 0, h - 1)
  xs = np.clip(xs, 0, w - 1)
  y_lo = np.floor(ys).astype(int)
  x_lo = np.floor(xs).astype(int)
  y_hi = np.minimum(y_lo + 1, h - 1)
  x_hi = np.minimum(x_lo + 1, w - 1)
  fy = (ys - y_lo)[:, None, None]
  fx = (xs - x_lo)[None, :, None]
  top = image[y_lo][:, x_lo] * (1 - fx) + image[y_lo][:, x_hi] * fx
  bottom = image[y_hi][:, x_lo] * (1 - fx) + image[y_hi][:, x_hi] * fx
  return top * (1 - fy) + bottom * fy


def psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def inception_box(rng, h, w):
  """vmoe's crop: area 5-100% of the image, log-uniform ratio 3/4-4/3."""
  for _ in range(10):
    area = rng.uniform(0.05, 1.0) * h * w
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = np.sqrt(area * ratio), np.sqrt(area / ratio)
    if cw <= w and ch <= h:
      x0 = rng.uniform(0, w - cw)
      y0 = rng.uniform(0, h - ch)
      return (x0, y0, x0 + cw, y0 + ch), area / (h * w)
  return (0, 0, w, h), 1.0


def quality(jpegs, canvases, num_crops):
  rng = np.random.default_rng(1)
  rows = {s: {'small': [], 'large': []} for s in canvases}
  vmoe_rows = {'small': [], 'large': []}
  for k in range(num_crops):
    data = jpegs[k % len(jpegs)]
    image = Image.open(io.BytesIO(data)).convert('RGB')
    original = np.asarray(image, np.float64)
    h, w = original.shape[:2]
    box, frac = inception_box(rng, h, w)
    bucket = 'small' if frac < 0.25 else 'large'
    ideal = np.asarray(
      image.resize((224, 224), Image.BILINEAR, box=box), np.float64
    )
    vmoe_rows[bucket].append(psnr(bilinear(original, box, 224), ideal))
    for s in canvases:
      canvas, _ = indexed.to_canvas(data, s, 3)
      sx, sy = s / w, s / h
      scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
      view = bilinear(canvas.astype(np.float64), scaled, 224)
      rows[s][bucket].append(psnr(view, ideal))
  return rows, vmoe_rows


def throughput(jpegs, canvas, batches, workers):
  class BenchJpegs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(num_classes=1000),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, data in enumerate(jpegs):
        # A file object keeps the JPEG bytes as they are (no re-encoding).
        yield i, {'image': io.BytesIO(data), 'label': i % 1000}

  with tempfile.TemporaryDirectory() as data_dir:
    return _time_pipeline(BenchJpegs, data_dir, canvas, batches, workers)


def _time_pipeline(builder_cls, data_dir, canvas, batches, workers):
  builder_cls(
    data_dir=data_dir, file_format='array_record'
  ).download_and_prepare()
  out = {}
  for n in workers:
    ds = tfds_data.TfdsDataset(
      'bench_jpegs', 'train', canvas, data_dir=data_dir, num_workers=n
    )
    it = ds.train_batches(64, seed=0)
    next(it)  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(it)
    images = 64 * batches
    out[n] = (
      images / (time.perf_counter() - t),
      images / (time.process_time() - cpu),
    )
  # Resume: time to the first batch at step 0 and at step 90,000 (the
  # position is computed, nothing before it is read).
  resume = {}
  for step in (0, 90_000):
    ds = tfds_data.TfdsDataset('bench_jpegs', 'train', canvas,
                               data_dir=data_dir, num_workers=1)  # fmt: skip
    t = time.perf_counter()
    next(ds.train_batches(64, seed=0, start_step=step))
    resume[step] = (time.perf_counter() - t, ds.records_read)
  return out, resume


def main(_):
  jpegs, sources = make_jpegs(_PHOTOS.value, _NUM.value)
  sizes = [len(j) for j in jpegs]
  print(
    f'{len(jpegs)} JPEGs, mean {np.mean(sizes) / 1e3:.0f} kB '
    f'(min {min(sizes) / 1e3:.0f}, max {max(sizes) / 1e3:.0f})'
  )
  canvases = [int(s) for s in _CANVASES.value]
  rows, vmoe_rows = quality(jpegs, canvases, _CROPS.value)
  print('\nPSNR (dB) of a 224 view against the antialiased ideal view')
  print('source            bytes/image  crops<25%  crops>=25%  all')
  for s in canvases:
    small, large = rows[s]['small'], rows[s]['large']
    print(
      f'canvas {s:3d}        {s * s * 3 + 12:9,d}  {np.mean(small):9.2f}  '
      f'{np.mean(large):10.2f}  {np.mean(small + large):5.2f}'
    )
  small, large = vmoe_rows['small'], vmoe_rows['large']
  print(
    f'vmoe (original)   {224 * 224 * 3 + 4:9,d}  {np.mean(small):9.2f}  '
    f'{np.mean(large):10.2f}  {np.mean(small + large):5.2f}'
  )
  print(f'({len(small)} small, {len(large)} large crops)')
  jpeg = [
    psnr(np.asarray(Image.open(io.BytesIO(j)).convert('RGB')), src)
    for j, src in zip(jpegs, sources, strict=True)
  ]
  print(
    f'For scale: JPEG q90 itself, decoded vs its source: {np.mean(jpeg):.2f}'
  )
  print('\nTraining pipeline (read + decode + canvas 320 + batch), images/s')
  rates, resume = throughput(jpegs, 320, _BATCHES.value, (1, 2))
  for n, (wall, per_cpu) in rates.items():
    print(
      f'  {n} decoding thread(s): {wall:.0f} images/s wall clock, '
      f'{per_cpu:.0f} images per CPU-second (= per busy core)'
    )
  print(f'  load average: {os.getloadavg()}')
  for step, (seconds, reads) in resume.items():
    print(f'first batch at step {step}: {seconds:.3f} s, {reads} records read')
  t = time.perf_counter()
  perm = indexed.epoch_permutation(0, 70, 1_281_167)
  print(
    f'one ImageNet-1k epoch permutation: {time.perf_counter() - t:.3f} s, '
    f'{perm.nbytes / 1e6:.1f} MB'
  )
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
  print(f'peak resident memory of this process: {rss:.0f} MB')


if __name__ == '__main__':
  flags.mark_flag_as_required('photos_dir')
  app.run(main, flags_parser=cli.parse_flags)
