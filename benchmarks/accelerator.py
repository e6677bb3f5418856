r"""One command for the first GPU or TPU: what a V-MoE-S/32 train step costs.

  python benchmarks/accelerator.py [--per_device_batch=32] [--steps=10]
  python benchmarks/accelerator.py --smoke      # tiny sizes (the test suite)

On whatever backend JAX has, for V-MoE-S/32 (configs/imagenet.py's model:
8 blocks of width 512, E=8, K=2 on blocks 5 and 7, two 224-px views per
image, synthetic images) at `per_device_batch` images per device, it prints
one Markdown table per part:

1. Train step: images/s and model FLOPs utilisation, float32 and bfloat16,
   `einsum` and `indices` dispatchers. FLOPs per step come from XLA's cost
   analysis of the compiled step (the partitioned program, so per device;
   what it computes, including the augmentation and the optimizer); MFU =
   FLOPs per device / step time / peak per device, with the peak from
   PEAK_FLOPS (sources there); "n/a" where the device is not in the table
   (CPUs).
2. On-device augmentation: the paired views alone (RandAugment(2, 10) on
   and off) as a share of the float32 `indices` step with the same setting.
3. Host input pipeline: decoded images/s of data/tfds_data.py (read, JPEG
   decode, resize to the 320-px canvas) with 1..N decoding threads on this
   machine's cores, on generated 500x375 JPEGs (quality 90) in a tfds
   ArrayRecord copy; with a single-GPU machine of 16 cores this, not the
   GPU, may bound training.
4. Expert-parallel all-to-all: per MoE layer, the time of one all_to_all of
   that layer's dispatch buffer over the 'expert' mesh axis (a step does 4
   per layer: dispatch and combine, forward and backward), where there is
   more than one device.

Timings are medians over `--steps` timed calls after one compile-and-warm-up
call. Nothing here is asserted; numbers go to benchmarks/README.md with the
device named.
"""

from __future__ import annotations

import importlib.util
import io
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from PIL import Image

# Measure the code of this checkout, not whatever vmoe_jsd is installed.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import input_pipeline  # noqa: E402 - benchmarks/, beside this file
from bench_setup import train_setup  # noqa: E402 - after the path above

from vmoe_jsd import augment, cli, sharding  # noqa: E402 - after the path above
from vmoe_jsd.data import mini  # noqa: E402 - after the path above
from vmoe_jsd.models import moe  # noqa: E402 - after the path above

_SMOKE = flags.DEFINE_bool('smoke', False, 'tiny sizes: checks, not numbers')
_BATCH = flags.DEFINE_integer(
  'per_device_batch', 32, 'images per device', lower_bound=1
)
_STEPS = flags.DEFINE_integer(
  'steps', 5, 'timed calls per measurement', lower_bound=1
)
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'model dtypes')
_DISPATCHERS = flags.DEFINE_list(
  'dispatchers', ['einsum', 'indices'], 'MoE dispatchers'
)
_THREADS = flags.DEFINE_list(
  'threads', [], 'decoding threads to try (default 1, 2, 4, ... cores)'
)
_PARTS = flags.DEFINE_list(
  'parts', ['step', 'augment', 'pipeline', 'all_to_all'], 'what to measure'
)

# Dense peak FLOP/s per JAX device, by a substring of `device_kind` (first
# match wins). float32 on NVIDIA GPUs: XLA's default matmul precision uses
# TF32 tensor cores, so the TF32 peak; on TPUs float32 matmuls run as
# bfloat16 passes by default, so one peak for both. Sources: NVIDIA H100
# datasheet (SXM: 989 TFLOP/s bf16, 495 TF32; PCIe 756 / 378; H200 has the
# H100 SXM's compute), A100 datasheet (312 / 156), L4 datasheet (121 / 60);
# Google Cloud TPU system architecture pages (per chip: v4 275, v5e 197,
# v5p 459, v6e 918; v3 123 per chip = 2 JAX devices of 61.5).
PEAK_FLOPS = (
  ('H200', {'bfloat16': 989e12, 'float32': 495e12}),
  ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
  ('H100', {'bfloat16': 989e12, 'float32': 495e12}),
  ('A100', {'bfloat16': 312e12, 'float32': 156e12}),
  ('L4', {'bfloat16': 121e12, 'float32': 60e12}),
  ('TPU v3', {'bfloat16': 61.5e12, 'float32': 61.5e12}),
  ('TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
  ('TPU v5 lite', {'bfloat16': 197e12, 'float32': 197e12}),
  ('TPU v5p', {'bfloat16': 459e12, 'float32': 459e12}),
  ('TPU v5', {'bfloat16': 459e12, 'float32': 459e12}),
  ('TPU v6 lite', {'bfloat16': 918e12, 'float32': 918e12}),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak dense FLOP/s of one device of this kind, or None if unknown."""
  for name, peaks in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peaks[dtype]
  return None


def _imagenet_config(smoke: bool) -> ml_collections.ConfigDict:
  path = os.path.join(ROOT, 'configs', 'imagenet.py')
  spec = importlib.util.spec_from_file_location('imagenet_cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('runlocal' if smoke else None)


def bench_config(smoke, per_device_batch, dtype, dispatcher, randaugment):
  """configs/imagenet.py's model and step on synthetic images of view size."""
  config = _imagenet_config(smoke)
  devices = jax.device_count()
  batch = per_device_batch * devices
  size = config.augment.size
  for split in ('train', 'test'):
    config.dataset[split] = ml_collections.ConfigDict(dict(
      name='synthetic', split=split, batch_size=batch, num_examples=batch,
      image_size=size, channels=3, num_classes=config.model.num_classes,
    ))  # fmt: skip
  config.num_expert_partitions = max(
    p for p in (1, 2, 4, 8) if devices % p == 0
  )
  config.model.dtype = dtype
  config.model.encoder.moe.router.dispatcher.name = dispatcher
  config.augment.randaugment = (2, 10) if randaugment else None
  return config


def _median_seconds(fn, steps):
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def time_train_step(config, steps):
  """(seconds per step, XLA FLOPs per step, images per step, the setup)."""
  s = train_setup(config)
  with jax.set_mesh(s.mesh):
    shardings = sharding.tree_shardings(s.state, s.mesh)
    shardings = shardings.replace(step=sharding.replicated(s.mesh))
    state = jax.device_put(s.state, shardings)
    images, labels = jax.device_put(
      (s.images, s.labels), sharding.batch_sharding(s.mesh)
    )
    compiled = (
      jax.jit(
        s.step_fn,
        in_shardings=(shardings, *(sharding.batch_sharding(s.mesh),) * 2),
        out_shardings=(shardings, None),
      )
      .lower(state, images, labels)
      .compile()
    )
    jax.block_until_ready(compiled(state, images, labels))
    seconds = _median_seconds(lambda: compiled(state, images, labels), steps)
  return seconds, _flops(compiled), s.b, s


def time_augmentation(setup, steps) -> float:
  """Seconds of the batch's paired views alone, with the step's settings."""
  fn = jax.jit(lambda k, x: augment.batched_paired_views(k, x, setup.settings))
  with jax.set_mesh(setup.mesh):
    images = jax.device_put(setup.images, sharding.batch_sharding(setup.mesh))
    key = jax.random.key(1)
    jax.block_until_ready(fn(key, images))
    return _median_seconds(lambda: fn(key, images), steps)


def step_table(smoke, batch, steps):
  kind = jax.devices()[0].device_kind
  rows, setups = [], {}
  for dtype in _DTYPES.value:
    for dispatcher in _DISPATCHERS.value:
      config = bench_config(smoke, batch, dtype, dispatcher, True)
      sec, flops, images, setup = time_train_step(config, steps)
      setups[(dtype, dispatcher)] = (sec, setup)
      peak = peak_flops(kind, dtype)
      mfu = f'{100 * flops / sec / peak:.1f}%' if peak else 'n/a'
      rows.append(
        f'| {dtype} | {dispatcher} | {images} x 2 | {sec * 1e3:.1f} | '
        f'{images / sec:.1f} | {flops / 1e9:.2f} | {mfu} |'
      )
  lines = [
    '| dtype | dispatcher | images x views | ms/step | images/s | '
    'GFLOP/step/device (XLA) | MFU |',
    '| --- | --- | --- | --- | --- | --- | --- |',
    *rows,
  ]
  return lines, setups


def augment_table(smoke, batch, steps, setups):
  rows = []
  for randaugment in (True, False):
    if randaugment and ('float32', 'indices') in setups:
      step_sec, setup = setups[('float32', 'indices')]
    else:
      config = bench_config(smoke, batch, 'float32', 'indices', randaugment)
      step_sec, _, _, setup = time_train_step(config, steps)
    aug = time_augmentation(setup, steps)
    rows.append(
      f'| {"RandAugment(2, 10)" if randaugment else "crop + flip only"} | '
      f'{aug * 1e3:.1f} | {step_sec * 1e3:.1f} | {100 * aug / step_sec:.1f}% |'
    )
  return [
    '| augmentation | views alone (ms) | float32 indices step (ms) | share |',
    '| --- | --- | --- | --- |',
    *rows,
  ]


def _jpegs(num, seed=0):
  """ImageNet-like JPEGs: smooth random colour images, 500x375 or 375x500."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    h, w = (375, 500) if i % 2 else (500, 375)
    small = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def pipeline_table(smoke, threads):
  num = 64 if smoke else 512
  batches = 1 if smoke else 8
  if not threads:
    cores = os.cpu_count() or 1
    threads = [n for n in (1, 2, 4, 8, 16, 32) if n <= min(cores, 16)]
    threads = threads[:2] if smoke else threads
  jpegs = _jpegs(num)
  with mini.captured_output():  # tfds's preparation lines, not the table's.
    results, _ = input_pipeline.throughput(jpegs, 320, batches, threads)
  rows = [
    f'| {n} | {wall:.0f} | {cpu:.0f} |' for n, (wall, cpu) in results.items()
  ]
  return [
    f'{os.cpu_count()} CPU cores; {num} JPEGs of 500x375, 320-px canvas, '
    'batches of 64.',
    '',
    '| decoding threads | images/s | images per CPU-second |',
    '| --- | --- | --- |',
    *rows,
  ]


def all_to_all_table(setups, steps):
  if jax.device_count() < 2:
    return ['n/a: one device (the all-to-all needs an expert mesh axis > 1).']
  if not setups:
    return ['n/a: needs the step part (its model and mesh).']
  _, setup = next(iter(setups.values()))  # the buffer's shape: any dtype
  spec, mesh = setup.spec, setup.mesh
  moe_cfg = spec.config['model']['encoder']['moe']
  router = moe_cfg['router']
  group = moe_cfg['group_size']
  hidden = spec.config['model']['hidden_size']
  experts = moe_cfg['num_experts']
  tokens = 2 * setup.b * spec.model.tokens_per_image(setup.settings.size)
  groups = tokens // group
  capacity = moe.compute_capacity(
    router['num_selected_experts'] * group, experts,
    router['dispatcher']['capacity_factor'],
  )  # fmt: skip
  shape = (groups, experts, capacity, hidden)
  spec_in = jax.sharding.PartitionSpec(sharding.BATCH_AXES)

  def exchange(x):
    return jax.lax.all_to_all(x, sharding.EXPERT_AXIS, 1, 0, tiled=True)

  fn = jax.jit(
    jax.shard_map(exchange, mesh=mesh, in_specs=spec_in, out_specs=spec_in)
  )
  with jax.set_mesh(mesh):
    x = jax.device_put(
      jnp.ones(shape, jnp.float32), jax.sharding.NamedSharding(mesh, spec_in)
    )
    jax.block_until_ready(fn(x))
    sec = _median_seconds(lambda: fn(x), steps)
  mib = np.prod(shape) * 4 / 2**20 / jax.device_count()
  return [
    f'Mesh {dict(mesh.shape)}; dispatch buffer (groups, E, C, D) = {shape} '
    f'float32, {mib:.2f} MiB per device.',
    '',
    '| MoE layer | one all_to_all (ms) | 4 per step (ms) |',
    '| --- | --- | --- |',
    *[
      f'| encoderblock_{b} | {sec * 1e3:.2f} | {4 * sec * 1e3:.2f} |'
      for b in spec.model.moe_layers
    ],
  ]


def main(_):
  tfds.disable_progress_bar()
  smoke, steps = _SMOKE.value, _STEPS.value
  batch = 2 if smoke else _BATCH.value
  steps = 1 if smoke else steps
  devices = jax.devices()
  print(
    f'# Accelerator benchmark: {jax.device_count()} x {devices[0].device_kind}'
    f' ({jax.default_backend()}), jax {jax.__version__}, '
    f'{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}'
    + (' (SMOKE: tiny model, numbers mean nothing)' if smoke else ''),
    flush=True,
  )
  print(f'\nV-MoE-S/32, {batch} images x 2 views per device.\n')
  setups = {}
  parts = set(_PARTS.value)
  if 'step' in parts:
    lines, setups = step_table(smoke, batch, steps)
    print('## Train step\n\n' + '\n'.join(lines) + '\n', flush=True)
  if 'augment' in parts:
    lines = augment_table(smoke, batch, steps, setups)
    print('## On-device augmentation\n\n' + '\n'.join(lines) + '\n')
  if 'pipeline' in parts:
    threads = [int(t) for t in _THREADS.value]
    lines = pipeline_table(smoke, threads)
    print('## Host input pipeline\n\n' + '\n'.join(lines) + '\n', flush=True)
  if 'all_to_all' in parts:
    lines = all_to_all_table(setups, steps)
    print('## Expert-parallel all-to-all\n\n' + '\n'.join(lines), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
