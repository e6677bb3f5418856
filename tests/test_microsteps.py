"""config.microsteps: one optimizer step from M micro-batches (step.py).

The reference is the M = 1 step, whose program is the one before micro-steps
existed (its lowered HLO is unchanged). On 8 simulated devices with a
(data 2, expert 4) mesh, M = 4 must give the same loss terms and the same
gradients (float32 round-off) for every loss that is a mean over examples,
routing groups or matched pairs. The batch-level cross_correlation loss is
computed per micro-batch instead: checked against a float64 numpy
computation of the pair-weighted mean of the per-micro-batch losses.
"""

import dataclasses

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config

from vmoe_jsd import (
  augment,
  config_lib,
  inspect_step,
  models,
  sharding,
  step,
  streams,
  train,
)

# 8 images per device; a routing group holds 2 images (x 2 views), so with
# M = 4 a micro-batch is one group, and only contiguous micro-batches route
# as the whole batch does (vmoe's strided ones would pair other images).
NUM_IMAGES = 64


def _config(**overrides):
  config = smoke_config.get_config()
  router = 'model.encoder.moe.router'
  values = {
    'dataset.train.batch_size': NUM_IMAGES,
    'dataset.test.batch_size': 32,
    'model.encoder.moe.group_size': 4 * 17,
    'num_expert_partitions': 4,
    f'{router}.noise_std': 0.0,  # Noise draws differ per micro-batch.
    f'{router}.z_loss_weight': 0.01,
    f'{router}.gshard_loss_weight': 0.01,
    'mixup.concentration': 0.2,
    'consistency.include_cls': True,
    'summaries.norms': True,
    'summaries.router': True,
  }
  values.update(overrides)
  return smoke_config.with_overrides(config, **values)


def _batch():
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (NUM_IMAGES, 16, 16, 3)).astype(np.uint8)
  labels = (np.arange(NUM_IMAGES) % 4).astype(np.int32)
  return images, labels


def _setup(config):
  spec = config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  setup = train.build_training(spec, mesh, 10, (16, 16, 3))
  with jax.set_mesh(mesh):
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)(
      setup.init_key
    )
  return spec, mesh, setup, state


def _grads_and_metrics(spec, mesh, setup, params, microsteps):
  step_spec = dataclasses.replace(spec.step, microsteps=microsteps)
  grad_fn = step.make_grad_fn(
    step_spec, setup.model, spec.views, streams.stream(spec.seed, 'train')
  )
  images, labels = _batch()
  put = sharding.make_put_batch(mesh)
  with jax.set_mesh(mesh):
    images, labels = put(images, labels)
    return jax.device_get(
      jax.jit(grad_fn)(params, jnp.int32(0), images, labels)
    )


def _assert_trees_close(a, b, rtol):
  flat_a = flax.traverse_util.flatten_dict(a, sep='/')
  flat_b = flax.traverse_util.flatten_dict(b, sep='/')
  assert flat_a.keys() == flat_b.keys()
  # Round-off relative to the largest entry: some gradients are 0 up to it
  # (attention's key bias cannot change a softmax).
  scale = max(np.abs(np.asarray(x)).max() for x in flat_a.values())
  for name in flat_a:
    x, y = np.asarray(flat_a[name]), np.asarray(flat_b[name])
    np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['jsd', 'margin'])
def test_four_microsteps_equal_one_batch(loss):
  """xent (mixup's soft targets), importance + z + GShard losses per group,
  the consistency mean over matched pairs (class-token pairs included),
  accuracy, dropped tokens and router statistics: same values and
  gradients, M = 4 vs M = 1."""
  spec, mesh, setup, state = _setup(_config(**{'consistency.loss': loss}))
  grads_1, metrics_1 = _grads_and_metrics(spec, mesh, setup, state.params, 1)
  grads_4, metrics_4 = _grads_and_metrics(spec, mesh, setup, state.params, 4)
  assert metrics_1.keys() == metrics_4.keys()
  assert metrics_1['matched_pairs'] == metrics_4['matched_pairs']
  assert 'router/encoderblock_1/top1_prob' in metrics_4
  # The micro-batches see different numbers of matched pairs, so an
  # unweighted mean of their consistency losses would be off.
  assert metrics_1['consistency'] > 0
  for key, value in metrics_1.items():
    np.testing.assert_allclose(
      metrics_4[key], value, rtol=2e-5, atol=1e-7, err_msg=key
    )
  _assert_trees_close(grads_1, grads_4, rtol=1e-4)


@pytest.mark.slow  # Four compiled train steps: about 40 s of CPU.
def test_four_microsteps_update_like_one_batch():
  """The whole train step (AdamW, gradient clipping, norm summaries): the
  updated parameters and the summaries of M = 4 match M = 1."""
  states, metrics = [], []
  for m in (1, 4):
    spec, mesh, setup, state = _setup(_config(microsteps=m))
    assert spec.step.microsteps == m
    images, labels = _batch()
    with jax.set_mesh(mesh):
      sizes = np.tile(np.int32([16, 16]), (NUM_IMAGES, 1))
      arrays = sharding.make_put_batch(mesh)(images, labels, sizes)
      new_state, out = setup.train_step(state, *arrays)
    states.append(jax.device_get(new_state.params))
    metrics.append(jax.device_get(out))
  _assert_trees_close(states[0], states[1], rtol=1e-4)
  for key in (
    'total_loss',
    'grad_norm',
    'norm/grads/router',
    'norm/updates/experts',
    'norm/params/global',
  ):
    np.testing.assert_allclose(metrics[1][key], metrics[0][key], rtol=1e-5)


def _cross_correlation_np(a, b, valid, diag_w=1.0, off_w=10.0):
  """PRC's loss in float64 numpy: C = E/N sum_valid p q^T."""

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p, q = softmax(a[valid]), softmax(b[valid])
  num_experts = a.shape[-1]
  c = num_experts * p.T @ q / max(valid.sum(), 1)
  off = ~np.eye(num_experts, dtype=bool)
  return diag_w * np.mean((np.diag(c) - 1) ** 2) + off_w * np.mean(c[off] ** 2)


def _pairs_np(logits, maps, prefix=1):
  """Matched pairs (both map directions and the class tokens) in numpy."""
  n = maps.shape[0]
  per_view = logits.reshape(n, 2, -1, logits.shape[-1])
  v1, v2 = per_view[:, 0, prefix:], per_view[:, 1, prefix:]
  rows = np.arange(n)[:, None]
  m12, m21 = maps[:, 0], maps[:, 1]
  a = np.concatenate([v1, v1[rows, np.maximum(m21, 0)], per_view[:, 0, :1]], 1)
  b = np.concatenate([v2[rows, np.maximum(m12, 0)], v2, per_view[:, 1, :1]], 1)
  valid = np.concatenate([m12 >= 0, m21 >= 0, np.ones((n, 1), bool)], 1)
  return a, b, valid


@pytest.mark.slow  # Two more programs: about 40 s of CPU.
def test_cross_correlation_is_per_microbatch():
  """PRC's cross-correlation normalises over the batch: with M = 4 the
  logged (and trained) value is the pair-weighted mean of the four
  micro-batches' losses, not the whole batch's (float64 references)."""
  config = _config(
    **{'consistency.loss': 'cross_correlation', 'mixup.concentration': 0.0}
  )
  spec, mesh, setup, state = _setup(config)
  _, metrics_1 = _grads_and_metrics(spec, mesh, setup, state.params, 1)
  _, metrics_4 = _grads_and_metrics(spec, mesh, setup, state.params, 4)
  # The router logits of the first MoE block depend on each image alone.
  images, _ = _batch()
  aug_key = streams.train_step_keys(streams.stream(spec.seed, 'train'), 0)[0]
  views, maps = augment.batched_paired_views(aug_key, images, spec.views)
  _, state_vars = setup.model.apply(
    {'params': state.params},
    augment.to_model_range(views.reshape(-1, *views.shape[2:])),
    rngs={'dropout': aug_key, 'gating': aug_key},
    mutable=['intermediates'],
  )
  logits = models.router_logits_by_layer(state_vars['intermediates'], (1,))
  logits = np.asarray(logits[1], np.float64)
  maps = np.asarray(maps)
  a, b, valid = _pairs_np(logits, maps)
  whole = _cross_correlation_np(a, b, valid)
  # Micro-batch m: the m-th pair of images of each device's 8 (8 devices).
  micro = np.arange(NUM_IMAGES).reshape(8, 4, 2).transpose(1, 0, 2)
  micro = micro.reshape(4, -1)
  values = [_cross_correlation_np(a[i], b[i], valid[i]) for i in micro]
  counts = [valid[i].sum() for i in micro]
  weighted = np.dot(values, counts) / np.sum(counts)
  np.testing.assert_allclose(metrics_1['consistency'], whole, rtol=1e-5)
  np.testing.assert_allclose(metrics_4['consistency'], weighted, rtol=1e-5)
  assert abs(whole - weighted) > 100 * 1e-5 * abs(whole)


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'microsteps': 0}, 'config.microsteps=0 is invalid: must be an integer'),
    ({'microsteps': 3}, 'must divide the 8 images per device'),
    (
      {'microsteps': 8},
      'each micro-batch must hold whole routing groups: 2 views x 1 images',
    ),
  ],
)
def test_microsteps_config_errors(overrides, message):
  config = _config(**overrides)
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.resolve(config, 8)
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_inspect_step_counts_loop_collectives_per_microstep():
  """With M = 2 the MoE all-to-alls sit in the micro-step loop: inspect_step
  counts each twice per step (4 per pass of the one MoE layer, as at M=1)."""
  config = _config(microsteps=2)
  lowered, mesh = train.lower_train_step(config)
  compiled = lowered.compile()
  rows = inspect_step.collective_rows(compiled, mesh, microsteps=2)
  to_all = [r for r in rows if r['kind'] == 'all-to-all']
  assert len(to_all) == 4 and all(r['runs_per_step'] == 2 for r in to_all)
  text = inspect_step.report(compiled, mesh, microsteps=2)
  per_step = sum(r['bytes'] for r in to_all) * 2 / inspect_step.MIB
  assert f'all-to-all           axes=expert       {per_step:10.4f} MiB' in text
