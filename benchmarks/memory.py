r"""Per-device memory of the compiled train step by model.dtype and remat.

  python benchmarks/memory.py --config=configs/default.py
  python benchmarks/memory.py --config=configs/imagenet.py \
      --config.dataset.train.batch_size=128

Compiles (nothing runs, no data is read: abstract shapes only) the train
step exactly as train.py jits it, on one device, for every combination of
model.dtype in --dtypes and model.encoder.remat in --remats, and prints
XLA's `memory_analysis()` of each: arguments (state and batch), outputs,
the bytes aliased between them (the donated state), temporaries
(activations kept for the backward pass and workspace) and their peak,
argument + output - alias + temp. The same for the model's forward and
backward pass alone (views as input), which is what dtype and remat act on
(the step adds the on-device augmentation's buffers). On CPU, XLA may keep
some bfloat16 arithmetic in float32 internally, so bfloat16 savings there
are a lower bound of an accelerator's.
"""

import itertools

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from vmoe_jsd import cli, config_lib, losses, models, optimizer, step, streams

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'model.dtype')
_REMATS = flags.DEFINE_list(
  'remats',
  ['none', 'full', 'dots_with_no_batch_dims_saveable', 'dots_saveable'],
  'model.encoder.remat values',
)

_STEP = flags.DEFINE_bool(
  'step', True, 'also compile the whole train step (augmentation included)'
)

MIB = 2**20


def memory_of_train_step(config) -> dict[str, float]:
  """memory_analysis() of the train step of `config`, in MiB, on 1 device."""
  spec = config_lib.resolve(config, jax.device_count())
  settings = spec.views
  model = spec.model.build(deterministic=False)
  tx, schedule = optimizer.make_optimizer(spec.optimizer, 1000)
  batch = spec.train_data.batch_size
  image_shape = spec.train_data.image_shape()
  channels = image_shape[-1]

  def init_state(key):
    dummy = jnp.zeros((2 * batch, settings.size, settings.size, channels))
    params = model.init({'params': key, 'dropout': key, 'gating': key}, dummy)
    return step.TrainState(
      jnp.int32(0), params['params'], tx.init(params['params'])
    )

  state = jax.eval_shape(init_state, jax.random.key(0))
  images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  train_step = jax.jit(
    step.make_train_step(
      spec.step, model, tx, schedule, settings,
      streams.stream(spec.seed, 'train'),
    ),
    donate_argnums=(0,),
  )  # fmt: skip
  lowered = train_step.lower(state, images, labels)
  return _mib(lowered.compile().memory_analysis())


def memory_of_model_grad(config) -> dict[str, float]:
  """The same for the model's forward and backward pass alone.

  Gradients of xent + auxiliary loss + a term on the sown router logits
  (as the consistency loss reads them) with respect to the parameters, on
  2 * batch float32 views given as input: no augmentation, no optimizer.
  """
  spec = config_lib.resolve(config, jax.device_count())
  settings = spec.views
  model = spec.model.build(deterministic=False)
  batch = spec.train_data.batch_size
  channels = spec.train_data.image_shape()[-1]
  views = jax.ShapeDtypeStruct(
    (2 * batch, settings.size, settings.size, channels), jnp.float32
  )
  labels = jax.ShapeDtypeStruct((2 * batch,), jnp.int32)
  key = jax.random.key(0)
  rngs = {'params': key, 'dropout': key, 'gating': key}
  params = jax.eval_shape(
    lambda v: model.init(rngs, v)['params'],
    views,
  )
  layers = spec.model.moe_layers

  def loss(p, v, y):
    (logits, metrics), state = model.apply(
      {'params': p},
      v,
      rngs={'dropout': key, 'gating': key},
      mutable=['intermediates'],
    )
    total = jnp.mean(losses.softmax_xent(logits, y))
    if layers:
      total += jnp.mean(metrics['auxiliary_loss'])
      for lg in models.router_logits_by_layer(
        state['intermediates'], layers
      ).values():
        total += jnp.mean(jnp.square(lg.astype(jnp.float32)))
    return total

  grad = jax.jit(jax.grad(loss))
  return _mib(grad.lower(params, views, labels).compile().memory_analysis())


def _mib(mem) -> dict[str, float]:
  out = {
    'arguments': mem.argument_size_in_bytes,
    'outputs': mem.output_size_in_bytes,
    'alias': mem.alias_size_in_bytes,
    'temp': mem.temp_size_in_bytes,
  }
  out['peak'] = out['arguments'] + out['outputs'] - out['alias'] + out['temp']
  return {k: v / MIB for k, v in out.items()}


def main(_):
  config = _CONFIG.value
  config_lib.validate(config, jax.device_count())
  print(
    f'batch {config.dataset.train.batch_size} images x 2 views, '
    f'{jax.devices()[0].platform}, MiB per device'
  )
  print(
    '| dtype | remat | step: args | out | aliased | temp | peak '
    '| model fwd+bwd: temp | peak |'
  )
  print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
  for dtype, remat in itertools.product(_DTYPES.value, _REMATS.value):
    with config.unlocked():
      config.model.dtype = dtype
      config.model.encoder.remat = remat
    m = memory_of_train_step(config) if _STEP.value else None
    g = memory_of_model_grad(config)
    step_cols = (
      f'{m["arguments"]:.1f} | {m["outputs"]:.1f} | {m["alias"]:.1f} | '
      f'{m["temp"]:.1f} | {m["peak"]:.1f}'
      if m
      else '- | - | - | - | -'
    )
    grad_cols = f'{g["temp"]:.1f} | {g["peak"]:.1f}'
    print(f'| {dtype} | {remat} | {step_cols} | {grad_cols} |', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
