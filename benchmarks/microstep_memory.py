r"""Per-device memory of the compiled train step for several config.microsteps.

  python benchmarks/microstep_memory.py --config=configs/imagenet.py \
      --num_devices=8 [--microsteps=1,2,4]

Compiles (nothing runs, no data is read) the train step of the config on
--num_devices simulated CPU devices once per value of config.microsteps, as
`python -m vmoe_jsd.inspect_step --config.microsteps=M` does, and the
on-device augmentation alone (augment.batched_paired_views) at the
per-device batch and at its 1/M share: the micro-step loop augments one
micro-batch at a time (step.microbatched_views). Prints a Markdown table in
GiB per device: arguments, outputs, aliased (donated state), temporaries
and their total (argument + output - alias + temp), XLA:CPU's
memory_analysis(). About 1 minute of CPU per compile for the ImageNet
config.
"""

import os
import re
import sys

# Measure the code of this checkout, not whatever vmoe_jsd is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vmoe_jsd import augment, cli, config_lib, inspect_step, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file')
_DEVICES = flags.DEFINE_integer(
  'num_devices', 8, 'simulated devices', lower_bound=1
)
_MICRO = flags.DEFINE_list('microsteps', ['1', '2', '4'], 'values of M')

GIB = 2**30


def _augment_temp(spec, per_device: int) -> float:
  """Temporaries (GiB) of the augmentation of `per_device` images."""
  shape = spec.train_data.image_shape()
  fn = jax.jit(
    lambda k, x, o: augment.batched_paired_views(k, x, spec.views, o)
  )
  compiled = fn.lower(
    jax.random.key(0),
    jax.ShapeDtypeStruct((per_device, *shape), jnp.uint8),
    jax.ShapeDtypeStruct((per_device, 2), jnp.int32),
  ).compile()
  return compiled.memory_analysis().temp_size_in_bytes / GIB


def main(_):
  # XLA reads XLA_FLAGS at the first device query, not at import.
  flag = f'--xla_force_host_platform_device_count={_DEVICES.value}'
  old = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
               os.environ.get('XLA_FLAGS', ''))  # fmt: skip
  os.environ['XLA_FLAGS'] = f'{old} {flag}'.strip()
  config = _CONFIG.value
  batch = config.dataset.train.batch_size
  per_device = batch // _DEVICES.value
  print(
    '| M | images per device per micro-batch | arguments | outputs | '
    'aliased | temporaries | total | augmentation alone, temp |'
  )
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for m in map(int, _MICRO.value):
    with config.unlocked():
      config.microsteps = m
    lowered, _ = train.lower_train_step(config)
    mem = inspect_step.memory_summary(lowered.compile())
    spec = config_lib.resolve(config, _DEVICES.value)
    aug = _augment_temp(spec, per_device // m)
    cells = [mem[k] / GIB for k in (
      'argument_size_in_bytes', 'output_size_in_bytes',
      'alias_size_in_bytes', 'temp_size_in_bytes', 'total_bytes')]  # fmt: skip
    print(f'| {m} | {per_device // m} | '
          + ' | '.join(f'{c:.3f}' for c in cells) + f' | {aug:.3f} |',
          flush=True)  # fmt: skip
  print(f'\n{_DEVICES.value} simulated {jax.devices()[0].platform} devices, '
        f'dataset.train.batch_size={batch}.')  # fmt: skip


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
