"""Loss functions against hand-computed and float64 brute-force references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jsd import losses

LN2 = math.log(2.0)


def jsd_reference(p, q):
  """Textbook JSD in float64, with 0 log 0 = 0."""
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  m = (p + q) / 2

  def kl(a, b):
    a_pos = a > 0
    return np.sum(np.where(a_pos, a * np.log(np.where(a_pos, a, 1) / b), 0))

  return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def log(x):
  return jnp.log(jnp.asarray(x, jnp.float32))


def test_jsd_hand_computed_values():
  p = jnp.array([0.2, 0.3, 0.5])
  assert float(losses.jensen_shannon(log(p), log(p))) == pytest.approx(
    0.0, abs=1e-7
  )
  one_hot_a = jnp.array([1.0, 0.0, 0.0, 0.0])
  one_hot_b = jnp.array([0.0, 0.0, 1.0, 0.0])
  assert float(
    losses.jensen_shannon(log(one_hot_a), log(one_hot_b))
  ) == pytest.approx(LN2, rel=1e-6)
  # Half-overlapping: p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4).
  # KL(p||m) = ln(4/3); KL(q||m) = 1/2 ln(2/3) + 1/2 ln 2.
  expected = 0.5 * math.log(4 / 3) + 0.5 * (
    0.5 * math.log(2 / 3) + 0.5 * math.log(2)
  )
  got = losses.jensen_shannon(log([1.0, 0.0]), log([0.5, 0.5]))
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_jsd_matches_float64_reference_and_is_symmetric():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 2, 6)) * 3
  p = jax.nn.softmax(logits[:, 0])
  q = jax.nn.softmax(logits[:, 1])
  got = losses.jensen_shannon(jnp.log(p), jnp.log(q))
  ref = np.array([jsd_reference(a, b) for a, b in zip(p, q, strict=True)])
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
    got, losses.jensen_shannon(jnp.log(q), jnp.log(p)), rtol=1e-6
  )
  assert np.all(np.asarray(got) <= LN2 + 1e-6)


def test_jsd_gradients_finite_at_equal_and_zero_probabilities():
  def f(logits_p, logits_q):
    return losses.jensen_shannon(
      jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q)
    )

  z = jnp.array([0.3, -1.0, 2.0])
  grads = jax.grad(f, argnums=(0, 1))(z, z)
  for g in grads:
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, 0.0, atol=1e-6)  # minimum at p = q
  # Exact zeros in the log domain (-inf log-probabilities).
  log_p = jnp.array([0.0, -jnp.inf, -jnp.inf])
  log_q = jnp.log(jnp.array([0.2, 0.3, 0.5]))
  value, g = jax.value_and_grad(lambda a: losses.jensen_shannon(log_p, a))(
    log_q
  )
  assert np.isfinite(value)
  assert np.all(np.isfinite(g))
  assert float(value) == pytest.approx(
    jsd_reference([1, 0, 0], [0.2, 0.3, 0.5]), rel=1e-5
  )


def brute_force_consistency(l1, l2, m12, m21, temperature):
  """Loop over images and patches in float64."""
  total, count = 0.0, 0
  for b in range(l1.shape[0]):
    for src, dst, mp in ((l1, l2, m12), (l2, l1, m21)):
      for i, j in enumerate(mp[b]):
        if j < 0:
          continue
        p = np.exp(src[b, i] / temperature)
        q = np.exp(dst[b, j] / temperature)
        total += jsd_reference(p / p.sum(), q / q.sum())
        count += 1
  return (total / count if count else 0.0), count


@pytest.mark.parametrize('temperature', [1.0, 2.5])
def test_router_consistency_against_brute_force(temperature):
  rng = np.random.default_rng(1)
  b, p, e = 3, 9, 4
  l1 = rng.normal(size=(b, p, e)) * 2
  l2 = rng.normal(size=(b, p, e)) * 2
  m12 = rng.integers(-1, p, size=(b, p))
  m21 = rng.integers(-1, p, size=(b, p))
  got, count = losses.router_consistency(
    jnp.asarray(l1), jnp.asarray(l2), jnp.asarray(m12), jnp.asarray(m21),
    temperature,
  )  # fmt: skip
  ref, ref_count = brute_force_consistency(l1, l2, m12, m21, temperature)
  assert int(count) == ref_count
  assert float(got) == pytest.approx(ref, rel=1e-5)


def test_router_consistency_ignores_unmatched_and_handles_no_pairs():
  l1 = jnp.zeros((1, 4, 3)).at[0, 0].set(jnp.array([5.0, 0, 0]))
  l2 = jnp.zeros((1, 4, 3)).at[0, 0].set(jnp.array([0, 5.0, 0]))
  # Patch 0 of each view is very different but unmatched: no effect.
  m12 = jnp.array([[-1, 1, 2, 3]])
  m21 = jnp.array([[-1, 1, 2, 3]])
  got, count = losses.router_consistency(l1, l2, m12, m21)
  assert int(count) == 6
  assert float(got) == pytest.approx(0.0, abs=1e-7)
  none = -jnp.ones((1, 4), jnp.int32)
  value, grad = jax.value_and_grad(
    lambda a: losses.router_consistency(a, l2, none, none)[0]
  )(l1)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_importance_loss_hand_computed_and_nan_free_at_balance():
  gates = jnp.array([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9], [0.7, 0.3]])
  # Importance (2.2, 1.8): mean 2, population std 0.2 -> (0.1)^2.
  assert float(losses.importance_loss(gates)) == pytest.approx(0.01, rel=1e-5)
  balanced = jnp.full((4, 4), 0.25)
  value, grad = jax.value_and_grad(losses.importance_loss)(balanced)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad))
  # vmoe's std-based form has NaN gradients exactly here.
  naive = lambda g: (jnp.std(g.sum(0)) / jnp.mean(g.sum(0))) ** 2
  assert np.any(np.isnan(jax.grad(naive)(balanced)))


def test_load_loss_against_float64_reference():
  rng = np.random.default_rng(2)
  s, e, k, sigma = 16, 4, 2, 0.25
  logits = rng.normal(size=(s, e))
  noisy = logits + sigma * rng.normal(size=(s, e))
  from scipy.stats import norm

  threshold = np.sort(noisy, axis=1)[:, -k][:, None]
  prob = 1 - norm.cdf((threshold - logits) / sigma)
  load = prob.mean(0)
  expected = load.var() / load.mean() ** 2
  got = losses.load_loss(jnp.asarray(logits), jnp.asarray(noisy), sigma, k)
  assert float(got) == pytest.approx(expected, rel=1e-4)
  grad = jax.grad(lambda x: losses.load_loss(x, x + 0.0, sigma, k))(
    jnp.zeros((s, e))
  )
  assert np.all(np.isfinite(grad))


def test_gshard_and_z_loss_hand_computed():
  gates = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
  # top-1 fractions (3/4, 1/4); mean gates (0.6, 0.4).
  expected = np.mean([0.75 * 0.6, 0.25 * 0.4]) * 4
  assert float(losses.gshard_loss(gates)) == pytest.approx(expected, rel=1e-6)
  logits = jnp.array([[0.0, 0.0], [1.0, 2.0]])
  z = [math.log(2), math.log(math.e + math.e**2)]
  assert float(losses.router_z_loss(logits)) == pytest.approx(
    np.mean(np.square(z)), rel=1e-6
  )


def test_classification_losses_hand_computed():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  lse = math.log(math.exp(2) + 1 + math.exp(-1))
  assert float(losses.softmax_xent(logits, jnp.array([1]))[0]) == (
    pytest.approx(lse - 0.0, rel=1e-6)
  )
  sig = lambda z: 1 / (1 + math.exp(-z))
  expected = -(
    math.log(1 - sig(2.0)) + math.log(sig(0.0)) + math.log(1 - sig(-1.0))
  )
  assert float(losses.sigmoid_xent(logits, jnp.array([1]))[0]) == (
    pytest.approx(expected, rel=1e-6)
  )
  with pytest.raises(ValueError, match="'hinge'.*softmax_xent"):
    losses.get_classification_loss('hinge')
