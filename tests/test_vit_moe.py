"""The V-MoE model: original's outputs, expert parallelism, sown logits."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vmoe_jsd import sharding
from vmoe_jsd.models import build_model, routing

FIXTURE = os.path.join(os.path.dirname(__file__), 'data', 'vmoe_parity')

TINY = dict(
  num_classes=5,
  patch_size=(4, 4),
  hidden_size=16,
  classifier='token',
  encoder=dict(
    num_layers=2,
    mlp_dim=32,
    num_heads=2,
    moe=dict(
      layers=(1,),
      num_experts=4,
      group_size=17 * 2,
      split_rngs=True,
      router=dict(
        num_selected_experts=2,
        noise_std=1.0,
        importance_loss_weight=0.01,
        load_loss_weight=0.01,
        dispatcher=dict(name='indices', capacity_factor=1.0),
      ),
    ),
  ),
)


@pytest.mark.parametrize('name', ['einsum', 'indices'])
def test_reproduces_original_vmoe_outputs(name):
  with open(os.path.join(FIXTURE, 'config.json')) as f:
    config = json.load(f)
  io = np.load(os.path.join(FIXTURE, 'io.npz'))
  flat = np.load(os.path.join(FIXTURE, 'params.npz'))
  params = flax.traverse_util.unflatten_dict(
    {tuple(k.split('/')): flat[k] for k in flat.files}
  )
  for cf in config['eval_capacity_factors']:
    model_cfg = {
      k: v
      for k, v in config.items()
      if k not in ('image_size', 'eval_capacity_factors')
    }
    dispatcher = model_cfg['encoder']['moe']['router']['dispatcher']
    dispatcher.update(capacity_factor=cf, name=name)
    model = build_model(model_cfg, deterministic=True)
    (logits, metrics), state = model.apply(
      {'params': params}, io['images'], mutable=['intermediates']
    )
    np.testing.assert_allclose(logits, io[f'logits_cf{cf}'], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(
      metrics['auxiliary_loss'], io[f'aux_loss_cf{cf}'], rtol=1e-5
    )
    for block in (1, 3):
      got = state['intermediates']['Encoder'][f'encoderblock_{block}']['Moe'][
        'Router'
      ][routing.ROUTER_LOGITS][0]
      np.testing.assert_allclose(
        got.reshape(-1, got.shape[-1]),
        io[f'router_logits_cf{cf}_encoderblock_{block}'],
        rtol=1e-5,
        atol=1e-6,
      )
  # cf 0.5 must actually drop tokens, else capacity is not being checked.
  assert float(metrics['encoderblock_1']['dropped_fraction'].mean()) > 0.1


def _init(model, images):
  key = jax.random.key(0)
  # Jitted: op-by-op init compiles every small op separately (slower).
  init = jax.jit(model.init)
  return init({'params': key, 'dropout': key, 'gating': key}, images)['params']


def test_parameter_names_follow_vmoe():
  model = build_model(TINY, deterministic=True)
  params = _init(model, jnp.zeros((2, 16, 16, 3)))
  names = set(sharding.flatten_names(params))
  assert 'Encoder/encoderblock_1/Moe/Router/dense/kernel' in names
  assert 'Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel' in names
  assert 'Encoder/encoderblock_0/Mlp/Dense_1/bias' in names
  assert 'Encoder/posembed_input/pos_embedding' in names
  assert {'cls', 'embedding/kernel', 'head/kernel'} <= names
  kernel = params['Encoder']['encoderblock_1']['Moe']['Mlp']['Dense_0'][
    'kernel'
  ]
  assert kernel.shape == (4, 16, 32)
  # split_rngs=True: experts start different.
  assert not np.allclose(kernel[0], kernel[1])


def test_router_logits_are_sown_clean():
  model = build_model(TINY, deterministic=False)
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  params = _init(model, images)
  rngs = {'dropout': jax.random.key(2), 'gating': jax.random.key(3)}
  _, state = model.apply(
    {'params': params}, images, rngs=rngs, mutable=['intermediates']
  )
  logits = state['intermediates']['Encoder']['encoderblock_1']['Moe']['Router'][
    routing.ROUTER_LOGITS
  ][0]
  assert logits.shape == (4 * 17 // 34, 34, 4)
  # The same numbers as the router's dense layer on the MoE input, with no
  # noise, although the router is noisy (deterministic=False).
  _, captured = model.apply(
    {'params': params},
    images,
    rngs=rngs,
    capture_intermediates=lambda mdl, _: mdl.name == 'LayerNorm_1',
    mutable=['intermediates'],
  )
  moe_input = captured['intermediates']['Encoder']['encoderblock_1'][
    'LayerNorm_1'
  ]['__call__'][0]
  kernel = params['Encoder']['encoderblock_1']['Moe']['Router']['dense'][
    'kernel'
  ]
  np.testing.assert_allclose(
    logits.reshape(-1, 4),
    moe_input.reshape(-1, 16) @ kernel,
    rtol=1e-5,
    atol=1e-5,
  )


def test_expert_parallel_matches_single_device():
  """(2 data x 4 expert) mesh: same outputs and gradients, via all-to-all."""
  assert jax.device_count() == 8, 'conftest sets 8 CPU devices'
  model = build_model(TINY, deterministic=False)
  images = jax.random.uniform(jax.random.key(1), (16, 16, 16, 3))
  params = _init(model, images)
  rngs = {'dropout': jax.random.key(2), 'gating': jax.random.key(3)}

  def loss(p, x):
    logits, metrics = model.apply({'params': p}, x, rngs=rngs)
    return jnp.mean(logits**2) + jnp.mean(metrics['auxiliary_loss']), logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (ref_loss, ref_logits), ref_grads = grad_fn(params, images)

  mesh = sharding.make_mesh(4)
  with jax.set_mesh(mesh):
    p_shard = sharding.tree_shardings(params, mesh)
    sharded_params = jax.device_put(params, p_shard)
    x = jax.device_put(images, sharding.batch_sharding(mesh))
    lowered = grad_fn.lower(sharded_params, x)
    (got_loss, got_logits), got_grads = grad_fn(sharded_params, x)
  hlo = lowered.compile().as_text()
  assert 'all-to-all' in hlo
  kernel = sharded_params['Encoder']['encoderblock_1']['Moe']['Mlp']['Dense_0'][
    'kernel'
  ]
  assert kernel.sharding.spec == PartitionSpec('expert')
  assert isinstance(kernel.sharding, NamedSharding)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(got_logits, ref_logits, rtol=1e-4, atol=1e-5)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
    got_grads,
    ref_grads,
  )


def test_group_size_must_divide_tokens():
  model = build_model(TINY, deterministic=True)
  with pytest.raises(ValueError, match='group_size=34 does not divide the 51'):
    _init(model, jnp.zeros((3, 16, 16, 3)))
