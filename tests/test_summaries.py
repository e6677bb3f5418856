"""config.summaries: norm summaries and router statistics (summaries.py).

References are float64 numpy computations from the same parameters,
gradients and router logits, walked with a flattening written here.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config

from vmoe_jsd import (
  augment,
  config_lib,
  models,
  run_files,
  sharding,
  step,
  streams,
  summaries,
  train,
)

NUM_IMAGES = 8


def _flatten(tree, prefix=''):
  """{'a/b/c': np.float64 array} of a nested mapping (not flax's)."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}/{key}' if prefix else key
    if hasattr(value, 'items'):
      out.update(_flatten(value, name))
    else:
      out[name] = np.asarray(value, np.float64)
  return out


def _np_norms(tree_name, tree, groups):
  flat = _flatten(tree)
  out = {
    f'norm/{tree_name}/global': np.sqrt(
      sum(np.sum(x**2) for x in flat.values())
    )
  }
  for group, regex in groups:
    members = [x for n, x in flat.items() if re.search(regex, n)]
    if members:
      out[f'norm/{tree_name}/{group}'] = np.sqrt(
        sum(np.sum(x**2) for x in members)
      )
  return out


def _np_router_statistics(logits):
  """logits (G, S, E) float64 -> (mean ||z||, mean lse^2, mean max p)."""
  z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  top = z.max(-1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(z - top).sum(-1))
  p = np.exp(z - lse[:, None])
  return (
    np.linalg.norm(z, axis=-1).mean(),
    np.mean(lse**2),
    p.max(-1).mean(),
  )


def test_tree_norms_against_numpy():
  """Global and group norms of a tree with the model's names; a group that
  matches nothing is left out; overlapping groups both count a leaf."""
  rng = np.random.RandomState(0)
  tree = {
    'Encoder': {
      'encoderblock_1': {
        'Moe': {
          'Router': {'dense': {'kernel': rng.randn(8, 4)}},
          'Mlp': {'Dense_0': {'kernel': rng.randn(4, 8, 16)}},
        },
        'SelfAttention': {'query': {'kernel': rng.randn(8, 2, 4)}},
      },
      'posembed_input': {'pos_embedding': rng.randn(1, 5, 8)},
    },
    'cls': rng.randn(1, 1, 8),
    'embedding': {'kernel': rng.randn(2, 2, 3, 8), 'bias': rng.randn(8)},
    'head': {'kernel': rng.randn(8, 3)},
  }
  groups = summaries.DEFAULT_NORM_GROUPS + (
    ('moe_block', r'encoderblock_1/Moe/'),  # overlaps router and experts
    ('nothing', r'^no_such_parameter$'),
  )
  as_jax = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
  got = summaries.tree_norms({'grads': as_jax}, groups)
  want = _np_norms('grads', tree, groups)
  assert sorted(got) == sorted(want)
  assert 'norm/grads/nothing' not in got and 'norm/grads/mlp' not in got
  for key, value in want.items():
    np.testing.assert_allclose(float(got[key]), value, rtol=1e-6, err_msg=key)
  # The default groups take the embedding as a whole and nothing else.
  emb = sum(np.sum(tree[k] ** 2) for k in ('cls',)) + sum(
    np.sum(x**2) for x in tree['embedding'].values()
  )
  emb += np.sum(tree['Encoder']['posembed_input']['pos_embedding'] ** 2)
  np.testing.assert_allclose(float(got['norm/grads/embedding']), np.sqrt(emb),
                             rtol=1e-6)  # fmt: skip


def test_router_statistics_against_numpy():
  rng = np.random.RandomState(1)
  logits = 3.0 * rng.randn(2, 6, 4)
  intermediates = {
    'Encoder': {
      'encoderblock_3': {
        'Moe': {'Router': {'router_logits': (jnp.float32(logits),)}}
      }
    }
  }
  got = summaries.router_statistics(intermediates, (3,))
  norm, z_loss, top1 = _np_router_statistics(logits)
  prefix = 'router/encoderblock_3'
  np.testing.assert_allclose(float(got[f'{prefix}/logit_norm']), norm, 1e-6)
  np.testing.assert_allclose(float(got[f'{prefix}/z_loss']), z_loss, 1e-6)
  np.testing.assert_allclose(float(got[f'{prefix}/top1_prob']), top1, 1e-6)


def _config(**overrides):
  values = {
    'num_expert_partitions': 4,
    'summaries.norms': True,
    'summaries.router': True,
  }
  values.update(overrides)
  return smoke_config.with_overrides(smoke_config.get_config(), **values)


@pytest.mark.slow
def test_in_step_summaries_match_numpy():
  """One train step on a (2, 4) mesh (experts sharded): the norms of the
  new params, the gradients (recomputed by step.make_grad_fn) and the
  updates (new - old params), and the router statistics of the step's
  views, against numpy."""
  spec = config_lib.validate(_config(), jax.device_count())
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  setup = train.build_training(spec, mesh, 10, (16, 16, 3))
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (NUM_IMAGES, 16, 16, 3)).astype(np.uint8)
  labels = (np.arange(NUM_IMAGES) % 4).astype(np.int32)
  sizes = np.tile(np.int32([16, 16]), (NUM_IMAGES, 1))
  train_key = streams.stream(spec.seed, 'train')
  grad_fn = jax.jit(step.make_grad_fn(spec.step, setup.model, spec.views,
                                      train_key))  # fmt: skip
  with jax.set_mesh(mesh):
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)(
      setup.init_key
    )
    old = jax.device_get(state.params)
    arrays = sharding.make_put_batch(mesh)(images, labels, sizes)
    grads, _ = jax.device_get(grad_fn(state.params, jnp.int32(0), *arrays))
    new_state, metrics = setup.train_step(state, *arrays)
  metrics, new = jax.device_get((metrics, new_state.params))
  updates = jax.tree_util.tree_map(
    lambda a, b: np.float64(a) - np.float64(b), new, old
  )
  groups = spec.step.summaries.norm_groups
  want = {
    **_np_norms('params', new, groups),
    **_np_norms('grads', grads, groups),
    **_np_norms('updates', updates, groups),
  }
  assert sorted(k for k in metrics if k.startswith('norm/')) == sorted(want)
  for key, value in want.items():
    # Updates from new - old params: float32 round-off of |params|.
    rtol = 1e-3 if key.startswith('norm/updates') else 1e-5
    np.testing.assert_allclose(metrics[key], value, rtol=rtol, err_msg=key)
  assert metrics['norm/grads/global'] == pytest.approx(metrics['grad_norm'])
  # Router statistics: clean logits of the same views and parameters.
  aug_key = streams.train_step_keys(train_key, 0)[0]
  views, _ = augment.batched_paired_views(aug_key, images, spec.views, sizes)
  views = augment.to_model_range(views.reshape(-1, *views.shape[2:]))
  _, state_vars = setup.model.apply(
    {'params': old}, views, rngs={'dropout': aug_key, 'gating': aug_key},
    mutable=['intermediates'],
  )  # fmt: skip
  logits = models.router_logits_by_layer(state_vars['intermediates'], (1,))[1]
  expected = _np_router_statistics(logits)
  for name, value in zip(
    ('logit_norm', 'z_loss', 'top1_prob'), expected, strict=True
  ):
    np.testing.assert_allclose(
      metrics[f'router/encoderblock_1/{name}'], value, rtol=1e-5
    )


@pytest.mark.slow  # A whole (tiny) run: about 30 s of CPU.
def test_summaries_reach_history_and_tensorboard(tmp_path):
  """Every report step's row of train_history.jsonl, and TensorBoard, carry
  the norms and the router statistics."""
  config = _config(num_train_steps=2, num_expert_partitions=1)
  train.train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, run_files.HISTORY)) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2]
  keys = ('norm/grads/router', 'norm/updates/experts', 'norm/params/global',
          'router/encoderblock_1/z_loss')  # fmt: skip
  for row in rows:
    assert all(np.isfinite(row[k]) for k in keys)
  # Step 1 runs at learning rate 0 (warm-up): no update yet.
  assert all(rows[-1][k] > 0 for k in keys)
  from tensorboard.backend.event_processing import (  # noqa: PLC0415 - slow
    plugin_event_accumulator as pea,
  )

  acc = pea.EventAccumulator(str(tmp_path))
  acc.Reload()
  tags = acc.Tags()['tensors']
  assert 'norm/grads/attention' in tags
  assert 'router/encoderblock_1/top1_prob' in tags


@pytest.mark.parametrize(
  'block, message',
  [
    ({'norm': True}, r"config.summaries=\['norm'\] is invalid: keys in"),
    ({'norms': 1}, 'config.summaries.norms=1 is invalid: True or False'),
    ({'norm_groups': [('a', '(')]}, 'regex: missing'),
    ({'norm_groups': [('a', 'x'), ('a', 'y')]}, 'distinct names'),
    ({'norm_groups': [('global', 'x')]}, "none named 'global'"),
    ({'norm_groups': ['router']}, 'list of \\(name, regex\\) pairs'),
  ],
)
def test_summary_config_errors(block, message):
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    summaries.SummarySpec.from_config(block)
  assert '\n' not in str(e.value)


def test_summaries_default_off_and_resolved():
  spec = config_lib.resolve(smoke_config.get_config(), 8)
  assert spec.step.summaries == summaries.SummarySpec()
  assert not spec.step.summaries.norms and not spec.step.summaries.router
  on = config_lib.resolve(_config(**{'summaries.norm_groups': [('r', 'R')]}), 8)
  assert on.step.summaries.norm_groups == (('r', 'R'),)
