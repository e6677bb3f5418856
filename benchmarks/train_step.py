r"""Times the jitted train step (and its augmentation alone) for a config.

  python benchmarks/train_step.py --config=configs/default.py \
      [--config.model.patch_size='(7,7)' ...] [--steps=20]

Prints ms per step and images/s (each image = 2 views), after compilation.
On N (simulated) devices the state and batch are sharded as in training:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python \
      benchmarks/train_step.py --config=configs/default.py \
      --config.num_expert_partitions=4
"""

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

# Measure the code of this checkout, not whatever vmoe_jsd is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_setup import train_setup  # noqa: E402 - after the path above

from vmoe_jsd import augment, cli, sharding  # noqa: E402 - after the path above

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file')
_STEPS = flags.DEFINE_integer('steps', 20, 'timed steps', lower_bound=1)


def main(_):
  s = train_setup(_CONFIG.value)
  mesh, settings = s.mesh, s.settings
  images, labels, state, key, b = s.images, s.labels, s.state, s.key, s.b
  # Keys made outside the mesh context: keys made by eager ops under it made
  # every later call of the augmentation tens of ms slower on CPU.
  keys = list(jax.random.split(key, _STEPS.value))
  with jax.set_mesh(mesh):
    # Placed as training places them (sharding.tree_shardings and batch
    # sharding), so that the step on N devices is the one training runs.
    shardings = sharding.tree_shardings(state, mesh)
    shardings = shardings.replace(step=sharding.replicated(mesh))
    state = jax.device_put(state, shardings)
    images, labels = jax.device_put(
      (images, labels), sharding.batch_sharding(mesh)
    )
    step = jax.jit(
      s.step_fn,
      in_shardings=(shardings, *(sharding.batch_sharding(mesh),) * 2),
      out_shardings=(shardings, None),
      donate_argnums=(0,),
    )
    aug = jax.jit(lambda k, x: augment.batched_paired_views(k, x, settings))
    t = time.time()
    state, m = step(state, images, labels)
    jax.block_until_ready(m)
    print(f'compile+first step: {time.time() - t:.1f}s')
    jax.block_until_ready(aug(key, images))
    t = time.time()
    for i in range(_STEPS.value):
      out = aug(keys[i], images)
    jax.block_until_ready(out)
    ta = (time.time() - t) / _STEPS.value
    t = time.time()
    for _ in range(_STEPS.value):
      state, m = step(state, images, labels)
    jax.block_until_ready(m)
    ts = (time.time() - t) / _STEPS.value
  n = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params))
  print(
    f'params {n:,}  batch {b}x2 views  step {ts * 1e3:.1f} ms  '
    f'({b / ts:.0f} img/s)  augmentation alone {ta * 1e3:.1f} ms'
  )


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
