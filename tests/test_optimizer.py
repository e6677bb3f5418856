"""Learning-rate schedules and weight-decay masks, against hand values."""

import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jsd import optimizer
from vmoe_jsd.optimizer import OptimizerSpec, ScheduleSpec


def _schedule(cfg, num_steps):
  return optimizer.make_schedule(ScheduleSpec.from_config(cfg), num_steps)


def _optimizer(cfg, num_steps):
  return optimizer.make_optimizer(OptimizerSpec.from_config(cfg), num_steps)


def test_warmup_cosine_schedule_hand_computed():
  fn = _schedule(
    {'schedule': 'warmup_cosine_decay', 'peak_value': 2.0, 'end_value': 0.2,
     'warmup_steps': 10}, num_steps=110)  # fmt: skip
  assert float(fn(0)) == pytest.approx(0.0)
  assert float(fn(5)) == pytest.approx(1.0)
  assert float(fn(10)) == pytest.approx(2.0)
  # Half way through the 100 decay steps: end + (peak - end) / 2.
  assert float(fn(60)) == pytest.approx(0.2 + 1.8 * 0.5, rel=1e-5)
  assert float(fn(110)) == pytest.approx(0.2, rel=1e-5)


def test_warmup_linear_and_rsqrt_schedules():
  lin = _schedule(
    {'schedule': 'warmup_linear_decay', 'peak_value': 1.0, 'end_value': 0.0,
     'warmup_steps': 4}, num_steps=14)  # fmt: skip
  assert float(lin(4)) == pytest.approx(1.0)
  assert float(lin(9)) == pytest.approx(0.5)
  rsqrt = _schedule(
    {'schedule': 'warmup_rsqrt_decay', 'peak_value': 1.0, 'warmup_steps': 4},
    num_steps=100,
  )
  assert float(rsqrt(4 + 12)) == pytest.approx((4 / 16) ** 0.5)


@pytest.mark.parametrize('weight_decay', [0.1, [('.*/kernel$', 0.1)]])
def test_weight_decay_hits_kernels_only(weight_decay):
  params = {'Dense_0': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'LayerNorm_0': {'scale': jnp.ones(2)}}  # fmt: skip
  tx, _ = _optimizer(
    {'name': 'adamw', 'weight_decay': weight_decay,
     'learning_rate': {'schedule': 'constant', 'peak_value': 0.5}},
    num_steps=10,
  )  # fmt: skip
  zero_grads = {k: {n: jnp.zeros_like(v) for n, v in d.items()}
                for k, d in params.items()}  # fmt: skip
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients Adam's step is 0: only decay moves a parameter,
  # by -lr * wd * param = -0.05.
  np.testing.assert_allclose(updates['Dense_0']['kernel'], -0.05)
  np.testing.assert_allclose(updates['Dense_0']['bias'], 0.0)
  np.testing.assert_allclose(updates['LayerNorm_0']['scale'], 0.0)


def test_global_norm_clipping():
  tx, _ = _optimizer(
    {'name': 'sgd', 'momentum': 0.0, 'gradient_clip': {'global_norm': 1.0},
     'learning_rate': {'schedule': 'constant', 'peak_value': 1.0}},
    num_steps=1,
  )  # fmt: skip
  params = {'w': jnp.zeros(2)}
  updates, _ = tx.update({'w': jnp.array([3.0, 4.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.6, -0.8], rtol=1e-6)
