"""config.optimizer.frozen_pattern and lr_multipliers (optimizer.py).

Frozen parameters against their initial bits after real training steps;
multiplied ones against SGD with momentum and weight decay computed by hand
in float64; the errors; the transfer config that uses a multiplier.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smoke_config

from vmoe_jsd import checkpoints, config_lib, data, optimizer, sharding, train
from vmoe_jsd.config_errors import ConfigError
from vmoe_jsd.optimizer import OptimizerSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROZEN = ('^embedding/', '/Moe/Router/')


def _smoke(**overrides):
  return smoke_config.with_overrides(smoke_config.get_config(), **overrides)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint32 if x.dtype.itemsize == 4 else np.uint16)


@pytest.mark.slow
def test_frozen_parameters_stay_bitwise_unchanged_through_training(tmp_path):
  """Four real train steps (train.build_training's jitted step on the
  8-device mesh: AdamW with weight decay, clipping, the consistency loss),
  saved and restored as a resumed run would be: the frozen patch embedding
  and router keep their initial bits, every other parameter moved, and the
  optimizer keeps no state for the frozen ones."""
  config = _smoke(**{'optimizer.frozen_pattern': FROZEN})
  spec = config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  train_ds = spec.train_data.load()
  setup = train.build_training(spec, mesh, 4, train_ds.image_shape)
  put_batch = sharding.make_put_batch(mesh)
  batches = train_ds.train_batches(spec.train_data.batch_size, seed=0)
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=4)
  with jax.set_mesh(mesh):
    init = jax.jit(setup.init_state, out_shardings=setup.state_shardings)(
      setup.init_key
    )
    before = sharding.flatten_names(jax.device_get(init.params))
    state = init
    for _ in range(4):  # lr 0, then 5e-4, 1e-3, ...: the params move.
      batch = next(batches)
      arrays = put_batch(batch['image'], batch['label'],
                         data.orig_sizes(batch))  # fmt: skip
      state, _ = setup.train_step(state, *arrays)
    ckpt.maybe_save(4, state, force=True)
    ckpt.wait()
    state, step = ckpt.restore_latest(
      checkpoints.abstract_like(setup.abstract_state, setup.state_shardings)
    )
  ckpt.close()
  assert step == 4 and int(state.step) == 4
  after = sharding.flatten_names(jax.device_get(state.params))
  frozen = [n for n in before if any(f in n for f in ('embedding/', 'Router'))]
  assert sorted(frozen) == [
    'Encoder/encoderblock_1/Moe/Router/dense/kernel', 'embedding/bias',
    'embedding/kernel',
  ]  # fmt: skip
  for name in before:
    if name in frozen:
      np.testing.assert_array_equal(_bits(after[name]), _bits(before[name]))
    else:
      assert not np.array_equal(after[name], before[name]), name
  state_names = [
    '/'.join(sharding.key_name(k) for k in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
  ]
  assert [n for n in state_names if n.endswith('0/Mlp/Dense_0/kernel')]
  assert not [n for n in state_names if n.endswith(tuple(frozen))]


def test_unknown_pattern_fails_in_one_line_when_the_step_is_built():
  config = _smoke(**{'optimizer.frozen_pattern': ('^embedding/', 'Routr')})
  spec = config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(spec.num_expert_partitions)
  with pytest.raises(ConfigError) as err:
    train.build_training(spec, mesh, 4, (16, 16, 3))
  message = str(err.value)
  assert message.startswith(
    "config.optimizer.frozen_pattern='Routr' is invalid: matches no "
    "parameter; parameter names look like ['Encoder/"
  )
  assert '\n' not in message


@pytest.mark.parametrize(
  'key, value, expected',
  [
    ('frozen_pattern', '(embedding', "frozen_pattern='(embedding' is invalid: "
     'not a valid regex'),
    ('frozen_pattern', 3, 'frozen_pattern=3 is invalid: a regex or a tuple'),
    ('lr_multipliers', [('head', 0.0)], "lr_multipliers['head']=0.0 is "
     'invalid: must be a number > 0'),
    ('lr_multipliers', [('head', 1.0, 2)], 'lr_multipliers=[('),
    ('lr_multipliers', [('[', 1.0)], "lr_multipliers='[' is invalid: not a"),
  ],
)  # fmt: skip
def test_bad_values_fail_at_resolution(key, value, expected):
  config = _smoke(**{f'optimizer.{key}': value})
  with pytest.raises(ConfigError, match='config.optimizer.') as err:
    config_lib.resolve(config, 1)
  assert expected in str(err.value) and '\n' not in str(err.value)


def _sgd(lr_multipliers=(), weight_decay=None):
  cfg = {
    'name': 'sgd', 'momentum': 0.9, 'lr_multipliers': lr_multipliers,
    'weight_decay': weight_decay,
    'learning_rate': {'schedule': 'warmup_linear_decay', 'peak_value': 1.0,
                      'end_value': 0.0, 'warmup_steps': 2},
  }  # fmt: skip
  return optimizer.make_optimizer(OptimizerSpec.from_config(cfg), 6)[0]


PARAMS = {
  'a': {'w': np.array([1.0, -2.0, 0.5], np.float32),
        'b': np.array([0.25, 3.0], np.float32)},
  'c': {'kernel': np.array([[1.0, 2.0], [-1.0, 0.0]], np.float32)},
}  # fmt: skip
# First match wins: a/w 0.5 (not 0.25), a/b 0.25, c/kernel (no rule) 1.
RULES = (('^a/w', 0.5), ('^a/', 0.25))
MULTIPLIERS = {'a/w': 0.5, 'a/b': 0.25, 'c/kernel': 1.0}


def test_multiplied_sgd_with_momentum_and_decay_matches_float64_by_hand():
  """Five steps: t = g + 0.9 t; p -= m * lr(s) * (t + wd * p), with lr(s)
  of the warm-up (2 steps) + linear decay (to step 6) written out. The
  decay is scaled by m as the rate is (decoupled decay rides on the step)."""
  lrs = [0.0, 0.5, 1.0, 0.75, 0.5]
  wd = 0.05
  tx = _sgd(RULES, weight_decay=[('.*', wd)])
  rng = np.random.RandomState(0)
  grads = [jax.tree_util.tree_map(
    lambda p: rng.randn(*p.shape).astype(np.float32), PARAMS)
    for _ in lrs]  # fmt: skip
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    params = jax.tree_util.tree_map(lambda p, d: p + d, params, u)
  ours = sharding.flatten_names(jax.device_get(params))
  for name, m in MULTIPLIERS.items():
    p = sharding.flatten_names(PARAMS)[name].astype(np.float64)
    t = np.zeros_like(p)
    for g, lr in zip(grads, lrs, strict=True):
      t = sharding.flatten_names(g)[name] + 0.9 * t
      p = p - m * lr * (t + wd * p)
    np.testing.assert_allclose(ours[name], p, rtol=2e-6, atol=1e-7)


def test_one_multiplied_step_is_exactly_m_times_the_plain_step():
  """Same state, same gradient: with m a power of two the multiplied
  update equals m times the plain one bit for bit."""
  plain, scaled = _sgd(), _sgd(RULES)
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  grads = jax.tree_util.tree_map(lambda p: p * 3.0 - 1.0, params)
  s_plain, s_scaled = plain.init(params), scaled.init(params)
  for _ in range(3):  # Momentum built up; lr 0, 0.5, 1.
    u1, s_plain = plain.update(grads, s_plain, params)
    um, s_scaled = scaled.update(grads, s_scaled, params)
  u1, um = sharding.flatten_names(u1), sharding.flatten_names(um)
  for name, m in MULTIPLIERS.items():
    assert np.any(u1[name] != 0)
    np.testing.assert_array_equal(um[name], m * np.asarray(u1[name]))


@pytest.mark.parametrize(
  'cfg, expected',
  [
    ({'lr_multipliers': [('^a/', 0.5), ('^a/w', 2.0)]},
     "lr_multipliers='^a/w' is invalid: every parameter it matches is taken "
     "by an earlier rule ['^a/']"),
    ({'lr_multipliers': [('^d/', 0.5)]},
     "lr_multipliers='^d/' is invalid: matches no parameter"),
    ({'frozen_pattern': ('^a/', 'c')},
     'freezes every parameter'),
  ],
)  # fmt: skip
def test_check_patterns_rejects_rules_that_decide_nothing(cfg, expected):
  spec = OptimizerSpec.from_config(
    {'name': 'sgd', 'learning_rate': {'peak_value': 1.0}, **cfg}
  )
  with pytest.raises(ConfigError, match='config.optimizer.') as err:
    optimizer.check_patterns(spec, PARAMS)
  assert expected in str(err.value)


def test_transfer_flowers102_slows_exactly_its_two_routers():
  path = os.path.join(ROOT, 'configs', 'transfer_flowers102.py')
  module_spec = importlib.util.spec_from_file_location('flowers', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config()
  config.initialization.path = '/pretrained'  # resolve() reads no file.
  spec = config_lib.resolve(config, 8)
  model = spec.model.build(deterministic=True)
  params = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((8, 224, 224, 3))
  )['params']
  optimizer.check_patterns(spec.optimizer, params)  # Every rule applies.
  slowed = {
    name: optimizer.multiplier_of(spec.optimizer.lr_multipliers, name)
    for name in sharding.flatten_names(params)
  }
  assert {n: m for n, m in slowed.items() if m != 1.0} == {
    'Encoder/encoderblock_5/Moe/Router/dense/kernel': 0.1,
    'Encoder/encoderblock_7/Moe/Router/dense/kernel': 0.1,
  }
  assert spec.optimizer.frozen_pattern == ()
