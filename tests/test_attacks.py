"""PGD against a linear model's closed-form worst case (and a brute force over
the box's vertices), projection invariants, and routing_changes against IoUs
computed by hand."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jsd import losses
from vmoe_jsd.config_errors import ConfigError
from vmoe_jsd.evaluation import attacks
from vmoe_jsd.models import moe as moe_lib

EPS = 0.1


def _linear_problem(seed=0, n=5, d=6):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-0.5, 0.5, size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, 2)).astype(np.float32)
  b = rng.normal(size=(2,)).astype(np.float32)
  y = rng.integers(0, 2, size=n)
  return x0, w, b, y


def _xent64(x, w, b, y):
  z = np.asarray(x, np.float64) @ w.astype(np.float64) + b
  z = z - z.max(-1, keepdims=True)
  return -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(-1)))


def test_pgd_reaches_the_closed_form_worst_case_of_a_linear_model():
  x0, w, b, y = _linear_problem()
  # Two classes: the loss grows with the margin (w_other - w_y) . x, which
  # the L-inf ball maximises at x0 + eps * sign(w_other - w_y).
  direction = np.sign(w[:, 1 - y] - w[:, y]).T.astype(np.float64)  # (n, d)
  x_star = x0.astype(np.float64) + EPS * direction
  worst = _xent64(x_star, w, b, y)
  # Independent check of the closed form: the loss is convex in x, so its
  # maximum over the box is at one of its 2^d vertices.
  for i in range(len(y)):
    vertices = np.array(list(itertools.product((-EPS, EPS), repeat=6)))
    brute = _xent64(x0[i] + vertices, w, b, np.full(len(vertices), y[i]))
    assert brute.max() == pytest.approx(worst[i], rel=1e-9)

  def objective(x):
    return jnp.sum(losses.softmax_xent(x @ w + b, jnp.asarray(y)))

  for steps in (1, 40):  # vmoe's step size eps / steps, no random start.
    x = attacks.pgd(objective, jnp.asarray(x0), epsilon=EPS, num_steps=steps,
                    step_size=EPS / steps)  # fmt: skip
    np.testing.assert_allclose(np.asarray(x), x_star, atol=1e-6)
    np.testing.assert_allclose(_xent64(x, w, b, y), worst, rtol=1e-5)


def test_projection_keeps_the_ball_and_the_pixel_range():
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-1, 1, size=(4, 8, 8, 1)), jnp.float32)
  x0 = x0.at[0].set(1.0).at[1].set(-1.0)  # On the range's edges.
  far = x0 + jnp.asarray(rng.normal(size=x0.shape) * 3, jnp.float32)
  p = attacks.project(far, x0, EPS)
  assert float(jnp.max(jnp.abs(p - x0))) <= EPS + 1e-7
  assert float(p.min()) >= -1.0 and float(p.max()) <= 1.0
  # The nearest point of the box [x0 - eps, x0 + eps] n [-1, 1], per pixel.
  lo = np.maximum(np.asarray(x0) - EPS, -1.0)
  hi = np.minimum(np.asarray(x0) + EPS, 1.0)
  np.testing.assert_array_equal(np.asarray(p), np.clip(far, lo, hi))
  np.testing.assert_array_equal(attacks.project(p, x0, EPS), p)  # Idempotent.
  unbounded = attacks.project(far, x0, EPS, bounds=None)
  np.testing.assert_allclose(unbounded, np.clip(far, x0 - EPS, x0 + EPS))

  # PGD with a random start and a step far larger than eps stays inside.
  x = attacks.pgd(lambda z: jnp.sum(jnp.sin(5 * z)), x0, epsilon=EPS,
                  num_steps=7, step_size=3 * EPS, start=far)  # fmt: skip
  assert float(jnp.max(jnp.abs(x - x0))) <= EPS + 1e-7
  assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def _sets(*experts, num_experts=4):
  out = np.zeros((len(experts), num_experts), bool)
  for t, chosen in enumerate(experts):
    out[t, list(chosen)] = True
  return jnp.asarray(out)


def test_iou_of_k2_sets_by_hand():
  before = _sets({0, 1}, {1, 2}, {0, 3}, {2, 3}, set())
  after = _sets({0, 2}, {1, 2}, {1, 2}, {3}, set())
  # {0,1} vs {0,2}: 1/3; equal: 1; disjoint: 0; {2,3} vs {3}: 1/2; both
  # empty (dropped twice): 0, as vmoe's sum_intersection_over_union.
  np.testing.assert_allclose(
    attacks.intersection_over_union(before, after), [1 / 3, 1, 0, 0.5, 0]
  )


def _router_logits(sets, big=10.0):
  """(1, S, E) logits whose top-2 are the given sets."""
  return jnp.asarray(np.where(np.asarray(sets), big, 0.0)[None], jnp.float32)


def test_routing_changes_against_hand_computed_iou():
  # One group of two images of 3 tokens (1 class token + 2 patches), K=2.
  before = _sets({0, 1}, {1, 2}, {0, 3}, {2, 3}, {0, 1}, {1, 3})
  after = _sets({0, 2}, {1, 2}, {1, 2}, {2, 3}, {2, 3}, {1, 3})
  rule = attacks.RoutingRule(
    num_selected_experts=2, capacity=6, batch_priority=False,
    num_prefix_tokens=1,
  )  # fmt: skip
  labels = jnp.array([0, 0])
  logits0 = jnp.array([[5.0, 0.0], [5.0, 0.0]])  # Predicts 0, 0.
  logits1 = jnp.array([[0.0, 5.0], [5.0, 0.0]])  # Predicts 1, 0.
  clean = (logits0, {'encoderblock_1': _router_logits(before)})
  attacked = (logits1, {'encoderblock_1': _router_logits(after)})
  for mask, images in (([True, True], (0, 1)), ([True, False], (0,))):
    sums = attacks.outcome_sums(
      'pgd', clean, attacked, labels, jnp.asarray(mask), losses.softmax_xent,
      rule,
    )  # fmt: skip
    # Per-image mean IoU over all 3 tokens: image 0 (1/3 + 1 + 0) / 3,
    # image 1 (1 + 0 + 1) / 3.
    per_image = [(1 / 3 + 1 + 0) / 3, (1 + 0 + 1) / 3]
    iou = sum(per_image[i] for i in images)
    assert float(sums['pgd/encoderblock_1/iou']) == pytest.approx(iou)
    # Top-1 (the first of a tied pair) over patch tokens only, the class
    # token left out: image 0: {1,2} -> {1,2} stays 1, {0,3} -> {1,2} flips
    # 0 -> 1; image 1: {0,1} -> {2,3} flips, {1,3} -> {1,3} stays.
    assert int(sums['pgd/encoderblock_1/flips']) == len(images)
    assert int(sums['pgd/encoderblock_1/pairs']) == 2 * len(images)
    assert int(sums['pgd/correct']) == (1 if images == (0, 1) else 0)
    assert int(sums['pgd/changed']) == 1
  totals = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  totals.update({'count': 1.0, 'clean/correct': 1.0, 'clean/loss': 0.0})
  spec = attacks.AttackSpec(attacks=('pgd',))
  result = attacks.summarize_attacks(totals, spec)
  assert result['pgd']['routing_changes']['encoderblock_1'] == pytest.approx(
    1 - (1 / 3 + 1 + 0) / 3
  )
  assert result['pgd']['accuracy_drop'] == pytest.approx(1.0)


def test_selected_experts_match_the_dispatchers_combine_weights():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(3, 12, 4)) * 2, jnp.float32)
  for k, capacity, bpr in ((2, 4, False), (1, 2, True), (2, 8, True)):
    got = attacks.selected_experts(logits, k, capacity, bpr)
    dispatcher, _ = moe_lib.make_top_k_dispatcher(
      jax.nn.softmax(logits), k, name='einsum', capacity=capacity,
      batch_priority=bpr,
    )  # fmt: skip
    # vmoe: an expert is selected where its (G, S, E, C) combine weights,
    # summed over C, are > 0.
    want = np.asarray(dispatcher.combine_weights).sum(-1) > 0
    np.testing.assert_array_equal(got, want)
  # By hand: every token of a group prefers expert 0 and capacity is 2, so
  # tokens 2 and 3 (vanilla order) lose their only choice.
  first = jnp.asarray([[[3.0, 0.0]] * 4])
  np.testing.assert_array_equal(
    attacks.selected_experts(first, 1, 2, False)[0],
    [[True, False], [True, False], [False, False], [False, False]],
  )


def test_kl_is_zero_at_the_clean_point_and_matches_float64():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(2, 5, 4))
  la = jax.nn.log_softmax(jnp.asarray(a, jnp.float32))
  lb = jax.nn.log_softmax(jnp.asarray(b, jnp.float32))
  pa = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
  want = np.sum(pa * np.log(pa / pb), -1)
  np.testing.assert_allclose(attacks.kl_divergence(la, lb), want, rtol=1e-5)
  np.testing.assert_allclose(attacks.kl_divergence(la, la), 0.0, atol=1e-7)


def test_attack_spec_defaults_are_vmoes_and_bad_values_fail_in_one_line():
  spec = attacks.AttackSpec.from_config({})
  assert spec.epsilon == 1 / 127.5 and spec.num_steps == 40
  assert spec.step_size == pytest.approx(1 / 127.5 / 40)
  assert not spec.random_start and spec.clip
  assert attacks.AttackSpec.from_config({'limit': 5000}, 300).limit == 300
  key = 'evaluate.robustness.attack'
  for cfg, match in (
    ({'epsilon': 0.0}, f'{key}.epsilon=0.0'),
    ({'num_steps': 0}, f'{key}.num_steps=0'),
    ({'divergence': 'l2'}, f"{key}.divergence='l2'"),
    ({'attacks': ('fgsm',)}, f"{key}.attacks=\\('fgsm',\\)"),
    ({'steps': 3}, f"{key}=\\['steps'\\]"),
  ):
    with pytest.raises(ConfigError, match=match) as info:
      attacks.AttackSpec.from_config(cfg)
    assert '\n' not in str(info.value)


def test_attack_table_has_headers_and_counts_images():
  result = {
    'num_examples': 256,
    'clean': {'accuracy': 0.8775},
    'pgd': {
      'accuracy': 0.25,
      'accuracy_drop': 0.6275,
      'prediction_changes': 0.7,
      'routing_changes': {'encoderblock_1': 0.3},
      'flip_rate': {'encoderblock_1': 0.2},
      'router_kl': {'encoderblock_1': 0.0123},
    },
  }
  lines = attacks.format_attacks(result).splitlines()
  assert lines[0] == '256 test images; clean accuracy on them 0.8775'
  assert lines[1].split() == ['attack', 'accuracy', 'drop', 'pred', 'changes']
  assert lines[2].split() == ['pgd', '0.2500', '0.6275', '0.700']
  assert lines[3].split() == [
    'attack', 'layer', 'routing', 'changes', 'flips', 'router', 'kl'
  ]  # fmt: skip
  assert lines[4].split() == ['pgd', 'encoderblock_1', '0.300', '0.200',
                              '0.0123']  # fmt: skip
  for header, row in ((lines[1], lines[2]), (lines[3], lines[4])):
    assert len(header) == len(row)  # right-aligned under the headers
