"""Model configs: variants, MoE placement, vmoe interop, Soft MoE."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jsd import checkpoints, models
from vmoe_jsd.models import routing

FIXTURE = os.path.join(os.path.dirname(__file__), 'data', 'vmoe_parity')


def test_variants_follow_vmoe_and_explicit_keys_win():
  cfg = models.resolve_model_config(
    {'variant': 'S/32', 'encoder': {'moe': {'layers': 'last 2'}}}
  )
  assert cfg['hidden_size'] == 512 and cfg['patch_size'] == (32, 32)
  assert cfg['encoder']['num_layers'] == 8  # vmoe's S: 8 blocks, not 12.
  assert cfg['encoder']['mlp_dim'] == 2048 and cfg['encoder']['num_heads'] == 8
  assert cfg['encoder']['moe']['layers'] == (5, 7)
  cfg = models.resolve_model_config(
    {'variant': 'B/16', 'hidden_size': 64, 'encoder': {'num_layers': 3}}
  )
  assert cfg['hidden_size'] == 64 and cfg['encoder']['num_layers'] == 3
  assert cfg['encoder']['mlp_dim'] == 3072
  for name, expected in [('Ti/16', (192, 12)), ('L/16', (1024, 24)),
                         ('H/14', (1280, 32))]:  # fmt: skip
    cfg = models.resolve_model_config({'variant': name})
    assert (cfg['hidden_size'], cfg['encoder']['num_layers']) == expected
  with pytest.raises(ValueError, match="variant='XL/16' is invalid"):
    models.resolve_model_config({'variant': 'XL/16'})


@pytest.mark.parametrize(
  'spec,num_layers,expected',
  [
    ('every 2', 8, (1, 3, 5, 7)),
    ('every 3', 12, (2, 5, 8, 11)),
    ('last 2', 12, (9, 11)),
    ('Last 1', 8, (7,)),
    ([3, 1], 8, (1, 3)),
  ],
)
def test_moe_placement(spec, num_layers, expected):
  assert models.moe_placement(spec, num_layers) == expected


def test_moe_placement_errors():
  with pytest.raises(ValueError, match="'first 2' is invalid"):
    models.moe_placement('first 2', 8)
  with pytest.raises(ValueError, match='only 4 odd blocks'):
    models.moe_placement('last 5', 8)


@pytest.mark.slow
def test_vmoe_checkpoint_and_config_reproduce_the_original():
  """Acceptance: vmoe-format checkpoint + vmoe config -> vmoe's outputs."""
  with open(os.path.join(FIXTURE, 'config.json')) as f:
    config = json.load(f)
  io = np.load(os.path.join(FIXTURE, 'io.npz'))
  params = checkpoints.read_vmoe_checkpoint(os.path.join(FIXTURE, 'checkpoint'))
  for cf in config['eval_capacity_factors']:
    vmoe_cfg = {
      k: v for k, v in config.items()
      if k not in ('image_size', 'eval_capacity_factors')
    }  # fmt: skip
    vmoe_cfg['encoder']['moe']['router']['dispatcher']['capacity_factor'] = cf
    model = models.from_vmoe_config(vmoe_cfg, deterministic=True)
    (logits, metrics), state = model.apply(
      {'params': params}, io['images'], mutable=['intermediates']
    )
    np.testing.assert_allclose(
      logits, io[f'logits_cf{cf}'], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
      metrics['auxiliary_loss'], io[f'aux_loss_cf{cf}'], rtol=1e-5
    )
    by_layer = models.router_logits_by_layer(state['intermediates'], (1, 3))
    for block, got in by_layer.items():
      np.testing.assert_allclose(
        got.reshape(-1, got.shape[-1]),
        io[f'router_logits_cf{cf}_encoderblock_{block}'],
        rtol=1e-5, atol=1e-6,
      )  # fmt: skip


def test_from_vmoe_config_maps_dotted_router_names_and_rejects_unknown_keys():
  cfg = {
    'num_classes': 3, 'patch_size': (4, 4), 'hidden_size': 8,
    'classifier': 'gap',
    'encoder': {'num_layers': 2, 'mlp_dim': 16, 'num_heads': 2,
                'moe': {'layers': (1,), 'num_experts': 2, 'group_size': 16,
                        'router': {'name': 'vmoe.projects.soft_moe.router.'
                                           'SoftRouter', 'num_slots': 4}}},
  }  # fmt: skip
  model = models.from_vmoe_config(cfg, deterministic=True)
  x = jnp.zeros((1, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)['params']
  router = params['Encoder']['encoderblock_1']['Moe']['Router']
  assert router['mu'].shape == (8, 2, 4) and router['scale'].shape == ()
  cfg['encoder']['moe']['router']['num_slot'] = 4
  with pytest.raises(ValueError, match="unknown keys \\['num_slot'\\]"):
    models.from_vmoe_config(cfg, deterministic=True)


def soft_moe_reference(x, mu, scale, expert_fn):
  """Soft MoE (Puigcerver et al. 2023, Algorithm 1) in float64 numpy."""
  x = np.asarray(x, np.float64)
  mu = np.asarray(mu, np.float64)
  xn = x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)
  mun = mu / np.sqrt((mu**2).sum(0, keepdims=True) + 1e-6)
  logits = scale * np.einsum('gsd,dep->gsep', xn, mun)
  d = np.exp(logits - logits.max(1, keepdims=True))
  d /= d.sum(1, keepdims=True)  # over tokens
  flat = logits.reshape(*logits.shape[:2], -1)
  c = np.exp(flat - flat.max(-1, keepdims=True))
  c = (c / c.sum(-1, keepdims=True)).reshape(logits.shape)  # over slots
  slots_in = np.einsum('gsep,gsd->gepd', d, x)
  slots_out = np.stack(
    [expert_fn(e, slots_in[:, e]) for e in range(mu.shape[1])], axis=1
  )
  token_expert = c.sum(-1)
  return np.einsum('gsep,gepd->gsd', c, slots_out), token_expert


def test_soft_router_against_reference():
  rng = np.random.default_rng(0)
  g, s, d, e, p = 2, 6, 4, 3, 2
  x = rng.normal(size=(g, s, d)).astype(np.float32)
  router = routing.SoftRouter(num_experts=e, num_slots=p, bfloat16=False,
                              deterministic=True)  # fmt: skip
  variables = router.init(jax.random.key(0), jnp.asarray(x))
  variables = jax.tree_util.tree_map(
    lambda v: v * 1.7 if v.ndim == 0 else v, variables
  )
  (dispatcher, metrics), state = router.apply(
    variables, jnp.asarray(x), mutable=['intermediates']
  )
  weights = rng.normal(size=(e, d, d)).astype(np.float32)
  buffers = dispatcher.dispatch(jnp.asarray(x))  # (G, E, P, D)
  y = dispatcher.combine(jnp.einsum('GEPD,EDF->GEPF', buffers, weights))
  params = variables['params']
  ref, token_expert = soft_moe_reference(
    x, params['mu'], float(params['scale']), lambda i, v: v @ weights[i]
  )
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  sown = state['intermediates'][routing.ROUTER_LOGITS][0]
  np.testing.assert_allclose(
    jax.nn.softmax(sown), token_expert, rtol=1e-5, atol=1e-6
  )
  assert np.all(np.asarray(metrics['auxiliary_loss']) == 0)


def test_parse_call_reads_vmoe_router_names():
  assert models.parse_call('NoisyTopExpertsPerItemRouter') == (
    'NoisyTopExpertsPerItemRouter',
    {},
  )
  assert models.parse_call(
    'vmoe.nn.routing.NoisyTopItemsPerExpertRouter(noise_std=1.5, '
    'dispatcher={"capacity_factor": 2.0})'
  ) == (
    'NoisyTopItemsPerExpertRouter',
    {'noise_std': 1.5, 'dispatcher': {'capacity_factor': 2.0}},
  )
  with pytest.raises(ValueError, match='Python literals'):
    models.parse_call('SoftRouter(num_slots=x)')


def test_vmoe_soft_moe_router_config_is_accepted():
  # As vmoe's soft_moe project writes it: sharding/monitoring keys included.
  cfg = {
    'num_classes': 3, 'patch_size': (4, 4), 'hidden_size': 8,
    'classifier': 'gap',
    'encoder': {'num_layers': 1, 'mlp_dim': 16, 'num_heads': 2,
                'dtype': 'float32',
                'moe': {'layers': (0,), 'num_experts': 2, 'group_size': 16,
                        'router': {'name': 'SoftRouter(num_slots=2)',
                                   'partition_spec': (('expert',),),
                                   'compute_similarity_metrics': True}}},
  }  # fmt: skip
  model = models.from_vmoe_config(cfg, deterministic=True)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))[
    'params'
  ]
  assert params['Encoder']['encoderblock_0']['Moe']['Router']['mu'].shape == (
    8,
    2,
    2,
  )
  cfg['encoder_cls'] = 'x'
  with pytest.raises(ValueError, match='encoder_cls'):
    models.from_vmoe_config(cfg, deterministic=True)
