"""Routing-consistency figures against a brute-force loop."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jsd.evaluation import accuracy


def brute_force(logits, maps, mask):
  logits = np.asarray(logits, np.float64)
  b, _, p, e = logits.shape
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  pairs = agree = 0
  jsd = 0.0
  counts = np.zeros(e)
  conf = ent = 0.0
  tokens = 0
  for i in range(b):
    if not mask[i]:
      continue
    for v in range(2):
      for t in range(p):
        pr = probs[i, v, t]
        counts[np.argmax(pr)] += 1
        conf += pr.max()
        ent += -np.sum(pr * np.log(pr))
        tokens += 1
        j = maps[i, v, t]
        if j < 0:
          continue
        q = probs[i, 1 - v, j]
        pairs += 1
        agree += np.argmax(pr) == np.argmax(q)
        m = (pr + q) / 2
        jsd += 0.5 * np.sum(pr * np.log(pr / m)) + 0.5 * np.sum(
          q * np.log(q / m)
        )
  load = counts / tokens
  agreement = agree / pairs
  chance = np.sum(load**2)
  return {
    'agreement': agreement,
    'chance': chance,
    'kappa': (agreement - chance) / (1 - chance),
    'jsd': jsd / pairs,
    'confidence': conf / tokens,
    'entropy': ent / tokens,
    'entropy_fraction': ent / tokens / math.log(e),
    'load': load,
    'pairs': pairs,
  }


def test_routing_figures_match_brute_force_over_batches():
  rng = np.random.default_rng(0)
  b, p, e = 5, 7, 3
  totals = {}
  all_logits, all_maps, all_mask = [], [], []
  for _ in range(3):  # Accumulate over batches, as evaluation does.
    logits = rng.normal(size=(b, 2, p, e)) * 2
    maps = rng.integers(-1, p, size=(b, 2, p))
    mask = rng.random(b) > 0.2
    sums = accuracy.routing_sums(
      jnp.asarray(logits, jnp.float32), jnp.asarray(maps), jnp.asarray(mask)
    )
    for k, v in sums.items():
      totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    all_logits.append(logits)
    all_maps.append(maps)
    all_mask.append(mask)
  got = accuracy.finalize_routing(totals)
  ref = brute_force(
    np.concatenate(all_logits), np.concatenate(all_maps),
    np.concatenate(all_mask),
  )  # fmt: skip
  for key in ('agreement', 'chance', 'kappa', 'jsd', 'confidence', 'entropy',
              'entropy_fraction'):  # fmt: skip
    assert got[key] == pytest.approx(ref[key], rel=1e-4), key
  np.testing.assert_allclose(got['load'], ref['load'], rtol=1e-6)
  assert got['pairs'] == ref['pairs']


def test_collapsed_router_has_full_agreement_but_no_kappa_and_chance_one():
  logits = jnp.zeros((2, 2, 4, 3)).at[..., 1].set(5.0)  # always expert 1
  maps = jnp.tile(jnp.arange(4), (2, 2, 1))
  figs = accuracy.finalize_routing(
    accuracy.routing_sums(logits, maps, jnp.ones(2, bool))
  )
  assert figs['agreement'] == 1.0
  assert figs['chance'] == pytest.approx(1.0)
  assert math.isnan(figs['kappa'])


def test_balanced_perfect_agreement_has_kappa_one():
  # Token t of both views routes to expert t % 4; identity maps.
  logits = jnp.asarray(np.eye(4)[np.arange(8) % 4] * 5.0)[None, None]
  logits = jnp.tile(logits, (1, 2, 1, 1))
  maps = jnp.tile(jnp.arange(8), (1, 2, 1))
  figs = accuracy.finalize_routing(
    accuracy.routing_sums(logits, maps, jnp.ones(1, bool))
  )
  assert figs['chance'] == pytest.approx(0.25)
  assert figs['kappa'] == pytest.approx(1.0)
  assert 'encoderblock_1' in accuracy.format_routing_table(
    {'encoderblock_1': figs}
  )
