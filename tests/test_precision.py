"""Mixed precision (model.dtype) and rematerialisation (encoder.remat).

bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.2%); through
the few matmuls of the tiny smoke model the rounding errors of losses and
gradients stay around 1%, so bfloat16 results are compared with float32 at a
few percent, while remat (the same float32 computation, recomputed) must
match to float32 round-off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm
from smoke_config import get_config, with_overrides

from vmoe_jsd import config_lib, losses, optimizer, step, streams
from vmoe_jsd.evaluation import accuracy


def _config(**overrides):
  return with_overrides(get_config(), **overrides)


def _batch(num_images=8, size=16):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, size, size, 1), np.uint8)
  labels = (np.arange(num_images) % 4).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def _one_train_step(config):
  """(state before, state after, metrics) of one jitted train step."""
  spec = config_lib.validate(config, jax.device_count())
  model = spec.model.build(deterministic=False)
  tx, schedule = optimizer.make_optimizer(spec.optimizer, 6)
  key = jax.random.key(0)
  dummy = jnp.zeros((16, 16, 16, 1))
  params = model.init({'params': key, 'dropout': key, 'gating': key}, dummy)
  state = step.TrainState(
    jnp.int32(0), params['params'], tx.init(params['params'])
  )
  train_step = jax.jit(
    step.make_train_step(
      spec.step, model, tx, schedule, spec.views,
      streams.stream(spec.seed, 'train'),
    )
  )  # fmt: skip
  new_state, metrics = train_step(state, *_batch())
  return state, new_state, jax.device_get(metrics)


def test_load_loss_accepts_bfloat16_and_computes_in_float32():
  # jax.scipy.stats.norm.cdf raises on bfloat16 (the crash of issue 6).
  rng = np.random.default_rng(3)
  s, e, k, sigma = 16, 4, 2, 0.25
  logits = jnp.asarray(rng.normal(size=(s, e)), jnp.bfloat16)
  noisy = (logits + sigma * rng.normal(size=(s, e))).astype(jnp.bfloat16)
  got = losses.load_loss(logits, noisy, sigma, k)
  # float64 reference on the same (bfloat16-rounded) inputs.
  lo = np.asarray(logits, np.float64)
  no = np.asarray(noisy, np.float64)
  threshold = np.sort(no, axis=1)[:, -k][:, None]
  load = (1 - norm.cdf((threshold - lo) / sigma)).mean(0)
  assert got.dtype == jnp.float32
  assert float(got) == pytest.approx(load.var() / load.mean() ** 2, rel=1e-4)


@pytest.mark.slow
def test_bfloat16_train_step_is_finite_close_to_float32_and_keeps_f32_state():
  # SGD at a constant learning rate 1 without decay: the update is -grads,
  # so the parameter change compares the two precisions' gradients.
  sgd = {
    'optimizer.name': 'sgd',
    'optimizer.weight_decay': 0.0,
    'optimizer.learning_rate': {'schedule': 'constant', 'peak_value': 1.0},
  }
  old, f32, m32 = _one_train_step(_config(**sgd))
  _, bf16, m16 = _one_train_step(_config(**sgd, **{'model.dtype': 'bfloat16'}))
  for state in (bf16.params, bf16.opt_state):
    dtypes = {x.dtype for x in jax.tree.leaves(state)}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, dtypes
  # The auxiliary losses are CV^2 of nearly balanced loads and the JSD of
  # nearly equal distributions: variances of small deviations, whose
  # relative error is that of the deviations (logits rounded to 2**-9
  # relative), not of the losses' own size; hence their looser bounds.
  tolerance = {
    'total_loss': 1e-2,
    'xent': 1e-2,
    'consistency': 5e-2,
    'auxiliary_loss': 1e-1,
  }
  for name, rel in tolerance.items():
    assert np.isfinite(m16[name]), name
    assert m16[name] == pytest.approx(m32[name], rel=rel), name
  assert m16['grad_norm'] == pytest.approx(m32['grad_norm'], rel=5e-2)

  def update(new):
    pairs = zip(
      jax.tree.leaves(new.params), jax.tree.leaves(old.params), strict=True
    )
    return np.concatenate([np.ravel(a - b) for a, b in pairs])

  u32, u16 = update(f32), update(bf16)
  assert np.all(np.isfinite(u16))
  rel = np.linalg.norm(u16 - u32) / np.linalg.norm(u32)
  assert rel < 0.05, rel


def _grads(remat):
  config = _config(**{'model.encoder.remat': remat})
  model = config_lib.validate(config, 8).model.build(deterministic=False)
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))
  key = jax.random.key(2)
  rngs = {'dropout': key, 'gating': jax.random.key(3)}
  params = model.init({'params': key, **rngs}, images)['params']

  def loss(p):
    (logits, metrics), state = model.apply(
      {'params': p}, images, rngs=rngs, mutable=['intermediates']
    )
    router = state['intermediates']['Encoder']['encoderblock_1']['Moe']
    logits_r = router['Router']['router_logits'][0]
    return (
      jnp.sum(jnp.sin(logits))
      + jnp.mean(metrics['auxiliary_loss'])
      + jnp.sum(logits_r**2)
    )

  fn = jax.value_and_grad(loss)
  return jax.jit(fn)(params), str(jax.make_jaxpr(fn)(params))


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients():
  (value, grads), jaxpr = _grads('none')
  assert 'checkpoint' not in jaxpr and 'remat' not in jaxpr
  for remat in ('full', 'dots_saveable', 'dots_with_no_batch_dims_saveable'):
    (value_r, grads_r), jaxpr_r = _grads(remat)
    # The blocks really are rematerialised (a checkpoint in the program).
    assert 'checkpoint' in jaxpr_r or 'remat' in jaxpr_r, remat
    assert float(value_r) == pytest.approx(float(value), rel=1e-6)
    for a, b in zip(
      jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=remat)


@pytest.mark.parametrize(
  'key, value, fragment',
  [
    ('model.dtype', 'float16', "model.dtype='float16' is unknown"),
    ('model.encoder.remat', 'dots', "'dots_with_no_batch_dims_saveable'"),
  ],
)
def test_bad_dtype_or_remat_fails_validation_listing_valid_names(
  key, value, fragment
):
  with pytest.raises(ValueError, match='choose one of') as err:
    config_lib.validate(_config(**{key: value}), 8)
  assert fragment in str(err.value)


def test_bfloat16_evaluation_is_close_to_float32():
  settings = config_lib.validate(_config(), 8).views
  images, labels = _batch(16)
  mask = jnp.arange(16) < 13
  params = None
  sums = {}
  for dtype in ('float32', 'bfloat16'):
    config = _config(
      **{'model.dtype': dtype, 'model.head_kernel_zero_init': False}
    )
    spec = config_lib.validate(config, 8)
    model = spec.model.build_eval()
    if params is None:
      params = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 1)))
      params = params['params']
    eval_step = jax.jit(
      accuracy.make_eval_step(
        model, spec.model, settings, streams.stream(spec.seed, 'eval_views')
      )
    )
    sums[dtype] = jax.device_get(
      eval_step(params, images, labels, mask, jnp.arange(16, dtype=jnp.int32))
    )
  f32, bf16 = sums['float32'], sums['bfloat16']
  assert bf16['count'] == f32['count'] == 13
  assert abs(int(bf16['correct']) - int(f32['correct'])) <= 1
  layer = 'routing/encoderblock_1/'
  figs = {
    dtype: accuracy.finalize_routing({
      k[len(layer):]: v for k, v in s.items() if k.startswith(layer)
    })
    for dtype, s in sums.items()
  }  # fmt: skip
  for name in ('jsd', 'confidence', 'entropy'):
    assert np.isfinite(figs['bfloat16'][name])
    assert figs['bfloat16'][name] == pytest.approx(
      figs['float32'][name], rel=3e-2, abs=1e-3
    ), name
