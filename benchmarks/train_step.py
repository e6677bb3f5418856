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

from absl import app, flags

# Measure the code of this checkout, not whatever vmoe_jsd is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file')
_STEPS = flags.DEFINE_integer('steps', 20, 'timed steps')


def main(_):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from vmoe_jsd import augment, config_lib, data, sharding, train
  from vmoe_jsd.models import build_model

  config = _CONFIG.value
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.num_expert_partitions)
  ds = data.get_dataset(config.dataset.train, config.augment.size)
  settings = config_lib.view_settings(config)
  model = build_model(config.model, deterministic=False)
  tx, schedule = train.make_optimizer(config.optimizer, 1000)
  b = config.dataset.train.batch_size
  batch = next(ds.train_batches(b, seed=0))
  images, labels = jnp.asarray(batch['image']), jnp.asarray(batch['label'])
  key = jax.random.key(0)
  # Keys made outside the mesh context: keys made by eager ops under it made
  # every later call of the augmentation tens of ms slower on CPU.
  keys = list(jax.random.split(key, _STEPS.value))
  with jax.set_mesh(mesh):
    dummy = jnp.zeros((2 * b, settings.size, settings.size, images.shape[-1]))
    params = model.init({'params': key, 'dropout': key, 'gating': key}, dummy)[
      'params'
    ]
    state = train.TrainState(jnp.int32(0), params, tx.init(params))
    # Placed as training places them (sharding.tree_shardings and batch
    # sharding), so that the step on N devices is the one training runs.
    shardings = sharding.tree_shardings(state, mesh)
    shardings = shardings.replace(step=sharding.replicated(mesh))
    state = jax.device_put(state, shardings)
    images, labels = jax.device_put(
      (images, labels), sharding.batch_sharding(mesh)
    )
    step = jax.jit(
      train.make_train_step(config, model, tx, schedule, settings),
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
  n = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  print(
    f'params {n:,}  batch {b}x2 views  step {ts * 1e3:.1f} ms  '
    f'({b / ts:.0f} img/s)  augmentation alone {ta * 1e3:.1f} ms'
  )


if __name__ == '__main__':
  app.run(main)
