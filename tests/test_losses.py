"""Loss functions against hand-computed and float64 brute-force references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from vmoe_jsd import losses, step
from vmoe_jsd.models import routing

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


# ----------------------------------------------------------------------------
# The consistency-loss family, against float64 loops over matched pairs.
# ----------------------------------------------------------------------------
def softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def pairs64(l1, l2, m12, m21, cls1=None, cls2=None):
  """(view-1 logits, view-2 logits) of every matched pair, in float64."""
  out = []
  for b in range(l1.shape[0]):
    for i, j in enumerate(m12[b]):
      if j >= 0:
        out.append((l1[b, i], l2[b, j]))
    for j, i in enumerate(m21[b]):
      if i >= 0:
        out.append((l1[b, i], l2[b, j]))
    if cls1 is not None:
      out.append((cls1[b], cls2[b]))
  return [(np.float64(x), np.float64(y)) for x, y in out]


def entropy64(p):
  return -np.sum(p * np.log(p))


def pair_reference(name, x, y, t=1.0, margin=1.0, cap=0.5, weight=1.0):
  p, q = softmax64(x / t), softmax64(y / t)
  if name == 'jsd':
    return jsd_reference(p, q)
  if name == 'sym_kl':
    kl = lambda a, b: np.sum(a * np.log(a / b))
    return 0.5 * (kl(p, q) + kl(q, p))
  if name == 'l2':
    return np.sum((p - q) ** 2)
  if name == 'hard_target':
    return -0.5 * (np.log(p[np.argmax(q)]) + np.log(q[np.argmax(p)]))
  if name == 'margin':
    k = np.argmax(p + q)

    def hinge(z):
      z = z / t
      return max(0.0, margin - (z[k] - np.max(np.delete(z, k))))

    return 0.5 * (hinge(x) + hinge(y))
  if name == 'jsd_entropy':
    e = len(p)
    excess = lambda a: max(0.0, entropy64(a) / np.log(e) - cap)
    return jsd_reference(p, q) + 0.5 * weight * (excess(p) + excess(q))
  raise AssertionError(name)


def cross_correlation64(pairs, t, dw, ow):
  e = len(pairs[0][0])
  c = np.zeros((e, e))
  for x, y in pairs:
    c += np.outer(softmax64(x / t), softmax64(y / t))
  c *= e / len(pairs)
  diag = np.mean((np.diag(c) - 1) ** 2)
  off = np.sum((c - np.diag(np.diag(c))) ** 2) / (e * (e - 1))
  return dw * diag + ow * off


def random_case(seed, b=3, p=9, e=4, scale=2.0):
  rng = np.random.default_rng(seed)
  l1 = rng.normal(size=(b, p, e)) * scale
  l2 = rng.normal(size=(b, p, e)) * scale
  m12 = rng.integers(-1, p, size=(b, p))
  m21 = rng.integers(-1, p, size=(b, p))
  cls1 = rng.normal(size=(b, e)) * scale
  cls2 = rng.normal(size=(b, e)) * scale
  return l1, l2, m12, m21, cls1, cls2


PAIRWISE = ('jsd', 'sym_kl', 'l2', 'hard_target', 'margin', 'jsd_entropy')


@pytest.mark.parametrize('name', PAIRWISE)
@pytest.mark.parametrize('temperature,include_cls', [(1.0, False), (0.5, True)])
def test_pairwise_consistency_losses_against_float64(
  name, temperature, include_cls
):
  l1, l2, m12, m21, cls1, cls2 = random_case(2)
  if not include_cls:
    cls1 = cls2 = None
  opts = losses.ConsistencyOptions(
    loss=name, temperature=temperature, margin=1.5, entropy_cap=0.6,
    entropy_weight=2.0, include_cls=include_cls,
  )  # fmt: skip
  as_j = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  got, count = losses.router_consistency(
    as_j(l1), as_j(l2), jnp.asarray(m12), jnp.asarray(m21),
    options=opts, cls_v1=as_j(cls1), cls_v2=as_j(cls2),
  )  # fmt: skip
  pairs = pairs64(l1, l2, m12, m21, cls1, cls2)
  ref = np.mean([
    pair_reference(name, x, y, temperature, 1.5, 0.6, 2.0) for x, y in pairs
  ])  # fmt: skip
  assert int(count) == len(pairs)
  assert float(got) == pytest.approx(ref, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_cross_correlation_against_float64(temperature):
  l1, l2, m12, m21, cls1, cls2 = random_case(3, e=5)
  opts = losses.ConsistencyOptions(
    loss='cross_correlation', temperature=temperature,
    diagonal_weight=0.7, offdiagonal_weight=3.0, include_cls=True,
  )  # fmt: skip
  got, _ = losses.router_consistency(
    *(jnp.asarray(x) for x in (l1, l2, m12, m21)), options=opts,
    cls_v1=jnp.asarray(cls1), cls_v2=jnp.asarray(cls2),
  )  # fmt: skip
  ref = cross_correlation64(
    pairs64(l1, l2, m12, m21, cls1, cls2), temperature, 0.7, 3.0
  )
  assert float(got) == pytest.approx(ref, rel=1e-5)


def test_cross_correlation_hand_values():
  e = 4
  opts = losses.ConsistencyOptions(loss='cross_correlation')
  ident = jnp.arange(e)[None]
  # Flat routers: C = 1/E everywhere; diagonal (1 - 1/4)^2 = 0.5625,
  # off-diagonal (1/4)^2 = 0.0625, weighted 1 and 10.
  flat = jnp.zeros((1, e, e))
  got, _ = losses.router_consistency(flat, flat, ident, ident, options=opts)
  assert float(got) == pytest.approx(0.5625 + 10 * 0.0625, rel=1e-6)
  # Sharp, agreeing, balanced (patch i -> expert i in both views): C = I.
  sharp = 40.0 * jnp.eye(e)[None]
  got, _ = losses.router_consistency(sharp, sharp, ident, ident, options=opts)
  assert float(got) == pytest.approx(0.0, abs=1e-6)
  # Sharp and agreeing but collapsed on expert 0: C_00 = 4, the rest 0:
  # diagonal ((4-1)^2 + 3 * 1) / 4 = 3.
  collapsed = jnp.zeros((1, e, e)).at[..., 0].set(40.0)
  got, _ = losses.router_consistency(
    collapsed, collapsed, ident, ident, options=opts
  )
  assert float(got) == pytest.approx(3.0, rel=1e-5)


def test_hard_target_and_margin_hand_values():
  # One pair each way (map identity on a single patch).
  ident = jnp.zeros((1, 1), jnp.int32)
  a = jnp.array([[[2.0, 0.0, 0.0]]])
  b = jnp.array([[[0.0, 1.0, 0.0]]])
  # hard_target: view 1 to expert 1 (view 2's top), view 2 to expert 0.
  lse_a = math.log(math.exp(2) + 2)
  lse_b = math.log(math.exp(1) + 2)
  expected = 0.5 * ((lse_a - 0.0) + (lse_b - 0.0))
  got, _ = losses.router_consistency(
    a, b, ident, ident, options=losses.ConsistencyOptions(loss='hard_target')
  )
  assert float(got) == pytest.approx(expected, rel=1e-6)
  # margin 1: p + q puts expert 0 first (e^2/(e^2+2) + 1/(e+2) > the
  # others). Gaps: view 1: 2 - 0 = 2 (hinge 0); view 2: 0 - 1 = -1
  # (hinge 2). Loss 1/2 (0 + 2) = 1.
  got, _ = losses.router_consistency(
    a, b, ident, ident, options=losses.ConsistencyOptions(loss='margin')
  )
  assert float(got) == pytest.approx(1.0, rel=1e-6)


FLATTENABLE = ('jsd', 'sym_kl', 'l2')
NOT_FLATTENABLE = ('hard_target', 'margin', 'jsd_entropy', 'cross_correlation')


@pytest.mark.parametrize('name', FLATTENABLE + NOT_FLATTENABLE)
def test_rescaling_logits_down_does_not_lower_the_robust_losses(name):
  """d loss / d s for logits s * z at near-uniform, mostly agreeing routers.

  The flattening failure mode is d/ds > 0: shrinking the logits (towards a
  uniform router) lowers the loss. JSD, sym_kl and l2 have it; the others
  must have d/ds < 0 (they ask for sharper routers, not flatter ones).
  """
  rng = np.random.default_rng(4)
  b, p, e = 4, 16, 4
  z1 = rng.normal(size=(b, p, e))
  z2 = z1 + 0.3 * rng.normal(size=(b, p, e))  # Mostly the same top-1.
  z1, z2 = jnp.asarray(0.3 * z1), jnp.asarray(0.3 * z2)  # Near uniform.
  ident = jnp.tile(jnp.arange(p)[None], (b, 1))
  opts = losses.ConsistencyOptions(loss=name)
  slope = jax.grad(
    lambda s: losses.router_consistency(
      s * z1, s * z2, ident, ident, options=opts
    )[0]
  )(1.0)
  if name in FLATTENABLE:
    assert float(slope) > 0
  else:
    assert float(slope) < 0


@pytest.mark.parametrize('name', sorted(losses.CONSISTENCY_LOSSES))
def test_stop_gradient_blocks_the_named_view(name):
  l1, l2, m12, m21, _, _ = random_case(5)
  args = [jnp.asarray(x, jnp.float32) for x in (l1, l2)]
  maps = [jnp.asarray(m12), jnp.asarray(m21)]

  def grads(stop):
    opts = losses.ConsistencyOptions(loss=name, stop_gradient=stop)
    return jax.grad(
      lambda a, b: losses.router_consistency(a, b, *maps, options=opts)[0],
      argnums=(0, 1),
    )(*args)

  g1, g2 = grads('none')
  assert np.abs(np.asarray(g1)).sum() > 0 and np.abs(np.asarray(g2)).sum() > 0
  g1, g2 = grads('view2')
  assert np.abs(np.asarray(g1)).sum() > 0
  assert np.all(np.asarray(g2) == 0)
  g1, g2 = grads('view1')
  assert np.all(np.asarray(g1) == 0)
  assert np.abs(np.asarray(g2)).sum() > 0


def test_consistency_options_reject_bad_values_naming_them():
  with pytest.raises(ValueError, match=r"'kl'.*cross_correlation.*jsd"):
    losses.ConsistencyOptions(loss='kl')
  with pytest.raises(ValueError, match=r"stop_gradient='both'.*view1"):
    losses.ConsistencyOptions(stop_gradient='both')
  with pytest.raises(ValueError, match=r'entropy_cap=1.5'):
    losses.ConsistencyOptions(entropy_cap=1.5)
  with pytest.raises(ValueError, match=r'margin=-1'):
    losses.ConsistencyOptions(margin=-1)


def test_train_consistency_loss_takes_class_token_and_patches_by_view():
  """step.consistency_loss slices the sown (G, S, E) router logits of 2B
  adjacent views into view-1 / view-2 patches and class tokens."""

  rng = np.random.default_rng(6)
  b, p, e = 2, 4, 3
  tokens = rng.normal(size=(b, 2, 1 + p, e)).astype(np.float32)
  maps = rng.integers(-1, p, size=(b, 2, p)).astype(np.int32)
  # Routing groups of 2 views: (G=b, S=2*(1+p), E).
  sown = jnp.asarray(tokens.reshape(b, 2 * (1 + p), e))
  inter = {'Encoder': {'encoderblock_1': {'Moe': {'Router': {
    routing.ROUTER_LOGITS: (sown,)}}}}}  # fmt: skip
  opts = losses.ConsistencyOptions(loss='sym_kl', include_cls=True)
  got, metrics = step.consistency_loss(
    inter, jnp.asarray(maps), layers=(1,), prefix=1, options=opts
  )
  pairs = pairs64(tokens[:, 0, 1:], tokens[:, 1, 1:], maps[:, 0], maps[:, 1],
                  tokens[:, 0, 0], tokens[:, 1, 0])  # fmt: skip
  ref = np.mean([pair_reference('sym_kl', x, y) for x, y in pairs])
  assert float(got) == pytest.approx(ref, rel=1e-5)
  assert int(metrics['matched_pairs']) == len(pairs)
