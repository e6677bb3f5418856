"""What the train-step benchmarks share: the config's model, optimizer,
mesh and one fixed training batch (imported by train_step.py and
checkpoint_stall.py, which run as scripts from this folder)."""

import types

import jax
import jax.numpy as jnp

from vmoe_jsd import config_lib, optimizer, sharding, step, streams


def train_setup(config) -> types.SimpleNamespace:
  """Validates `config` and builds what a train step needs, on the CPU/GPU
  devices JAX sees.

  Returns:
    A namespace with spec (the config's RunSpec), mesh, ds (the training
    dataset), settings (view settings), model, tx, schedule, step_fn (the
    pure train step, to jit), b (batch size), images, labels (one batch as
    device arrays), key (jax.random.key(0)) and state.
  """
  spec = config_lib.validate(config, jax.device_count())
  ds = spec.train_data.load()
  tx, schedule = optimizer.make_optimizer(spec.optimizer, 1000)
  b = spec.train_data.batch_size
  batch = next(ds.train_batches(b, seed=0))
  images = jnp.asarray(batch['image'])
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  settings = spec.views
  model = spec.model.build(deterministic=False)
  step_fn = step.make_train_step(
    spec.step, model, tx, schedule, settings, streams.stream(spec.seed, 'train')
  )
  key = jax.random.key(0)
  with jax.set_mesh(mesh):
    dummy = jnp.zeros((2 * b, settings.size, settings.size, images.shape[-1]))
    rngs = {'params': key, 'dropout': key, 'gating': key}
    params = model.init(rngs, dummy)['params']
    state = step.TrainState(jnp.int32(0), params, tx.init(params))
  return types.SimpleNamespace(
    spec=spec, mesh=mesh, ds=ds, settings=settings, model=model, tx=tx,
    schedule=schedule, step_fn=step_fn, b=b, images=images,
    labels=jnp.asarray(batch['label']), key=key, state=state,
  )  # fmt: skip
