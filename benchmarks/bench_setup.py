"""What the train-step benchmarks share: the config's model, optimizer,
mesh and one fixed training batch (imported by train_step.py and
checkpoint_stall.py, which run as scripts from this folder)."""

import types


def train_setup(config) -> types.SimpleNamespace:
  """Validates `config` and builds what a train step needs, on the CPU/GPU
  devices JAX sees.

  Returns:
    A namespace with mesh, ds (the training dataset), settings (view
    settings), model, tx, schedule, b (batch size), images, labels (one
    batch as device arrays) and key (jax.random.key(0)).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from vmoe_jsd import config_lib, data, sharding, train  # noqa: PLC0415
  from vmoe_jsd.models import build_model  # noqa: PLC0415

  config_lib.validate(config, jax.device_count())
  ds = data.get_dataset(config.dataset.train, config.augment.size)
  tx, schedule = train.make_optimizer(config.optimizer, 1000)
  b = config.dataset.train.batch_size
  batch = next(ds.train_batches(b, seed=0))
  images = jnp.asarray(batch['image'])
  mesh = sharding.make_mesh(config.num_expert_partitions)
  settings = config_lib.view_settings(config)
  model = build_model(config.model, deterministic=False)
  key = jax.random.key(0)
  with jax.set_mesh(mesh):
    dummy = jnp.zeros((2 * b, settings.size, settings.size, images.shape[-1]))
    rngs = {'params': key, 'dropout': key, 'gating': key}
    params = model.init(rngs, dummy)['params']
    state = train.TrainState(jnp.int32(0), params, tx.init(params))
  return types.SimpleNamespace(
    mesh=mesh, ds=ds, settings=settings, model=model, tx=tx,
    schedule=schedule, b=b, images=images,
    labels=jnp.asarray(batch['label']), key=key, state=state,
  )  # fmt: skip
