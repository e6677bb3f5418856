r"""Times the device-side paired-view augmentation at ImageNet size.

  python benchmarks/augment.py [--batch=64] [--size=224] [--canvas=320] \
      [--steps=10] [--variants=crop,randaugment,randaugment_geometry,mixup]

Each batch holds `batch` uint8 canvases of `canvas` x `canvas` x 3 with their
original sizes (the host's stretched whole images, ISSUE 7); each image gives
two views of `size` px and their patch maps (patch 32, as V-MoE-S/32). The
variants:
  crop                  inception crop (area 5-100%) + flip, vmoe's crop;
  randaugment           + RandAugment(2, 10), all 16 ops (vmoe's light1);
  randaugment_geometry  + RandAugment(2, 10) with photometric=False (the
                        geometric ops and Cutout only);
  mixup                 randaugment + mixup 0.2 on the views.
Prints, per variant, ms per batch, images/s (each image = 2 views) and
images per CPU-second of the process after compilation, on whatever
jax.devices()[0] is (CPU here).
"""

import os
import time

import jax
import numpy as np
from absl import app, flags

from vmoe_jsd import augment, cli

_BATCH = flags.DEFINE_integer('batch', 64, 'images per batch', lower_bound=1)
_SIZE = flags.DEFINE_integer('size', 224, 'view side', lower_bound=1)
_CANVAS = flags.DEFINE_integer('canvas', 320, 'host canvas side', lower_bound=1)
_STEPS = flags.DEFINE_integer(
  'steps', 10, 'timed batches per variant', lower_bound=1
)
_VARIANTS = flags.DEFINE_list(
  'variants',
  ['crop', 'randaugment', 'randaugment_geometry', 'mixup'],
  'variants to time',
)


def main(_):
  rng = np.random.RandomState(0)
  b, canvas = _BATCH.value, _CANVAS.value
  # Smooth random images (not noise), so the colour ops' histograms are
  # those of images; originals of ImageNet-like sizes around 500 x 375.
  small = rng.randint(0, 256, (b, canvas // 16, canvas // 16, 3))
  images = np.repeat(np.repeat(small, 16, axis=1), 16, axis=2).astype(np.uint8)
  orig = np.stack(
    [rng.randint(300, 500, b), rng.randint(300, 500, b)], axis=1
  ).astype(np.int32)
  base = dict(
    size=_SIZE.value,
    patch_size=32,
    crop_scale=(0.05, 1.0),
    fill_value=128 / 255,
  )
  settings = {
    'crop': augment.ViewSettings(**base),
    'randaugment': augment.ViewSettings(**base, randaugment=(2, 10)),
    'randaugment_geometry': augment.ViewSettings(
      **base, randaugment=(2, 10), photometric=False
    ),
    'mixup': augment.ViewSettings(**base, randaugment=(2, 10)),
  }
  keys = list(jax.random.split(jax.random.key(0), _STEPS.value + 1))
  labels = np.arange(b, dtype=np.int32) % 1000

  print(
    f'device {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, '
    f'load average {os.getloadavg()[0]:.1f}; batch {b} canvases '
    f'{canvas}x{canvas}x3 -> 2 views of {_SIZE.value} px'
  )
  for name in _VARIANTS.value:
    view_settings = settings[name]

    def run(key, images, orig, view_settings=view_settings, name=name):
      views, maps = augment.batched_paired_views(
        key, images, view_settings, orig
      )
      if name == 'mixup':
        views, maps, labels_out, _ = augment.mixup(
          jax.random.fold_in(key, 1),
          views,
          maps,
          labels,
          concentration=0.2,
          num_classes=1000,
        )
        return views, maps, labels_out
      return views, maps

    fn = jax.jit(run)
    t = time.time()
    jax.block_until_ready(fn(keys[-1], images, orig))
    compile_s = time.time() - t
    t, cpu = time.time(), time.process_time()
    for i in range(_STEPS.value):
      out = fn(keys[i], images, orig)
    jax.block_until_ready(out)
    dt = (time.time() - t) / _STEPS.value
    # CPU seconds of all this process's threads: steadier than wall time on a
    # shared machine.
    dcpu = (time.process_time() - cpu) / _STEPS.value
    print(
      f'{name:22s} {dt * 1e3:8.1f} ms/batch  {b / dt:7.1f} images/s '
      f'({2 * b / dt:7.1f} views/s)  {b / dcpu:7.1f} images per CPU-second'
      f'  compile+first {compile_s:.1f}s',
      flush=True,
    )


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
