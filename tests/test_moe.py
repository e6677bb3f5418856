"""Routing and dispatch against a slow, obviously correct loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jsd import models
from vmoe_jsd.models import moe


def loop_top_k_routing(gates, k, capacity, batch_priority):
  """Reference: serve rank 0 of every token, then rank 1, ...; in token
  order, or by decreasing top gate with BPR; an expert takes a choice while
  it has free slots. Returns {(token, expert): (slot, gate)}."""
  gates = np.asarray(gates, np.float64)
  s, e = gates.shape
  ranked = [list(np.argsort(-gates[t], kind='stable')[:k]) for t in range(s)]
  order = list(range(s))
  if batch_priority:
    order = sorted(order, key=lambda t: (-gates[t].max(), t))
  used = [0] * e
  kept = {}
  for rank in range(k):
    for t in order:
      expert = ranked[t][rank]
      if used[expert] < capacity:
        kept[(t, expert)] = (used[expert], gates[t, expert])
      used[expert] += 1
  return kept


def loop_moe(x, gates, k, capacity, batch_priority, expert_fns):
  """Reference MoE output: sum of gate * expert(x) over kept choices."""
  out = np.zeros_like(x)
  for (t, expert), (_, gate) in loop_top_k_routing(
    gates, k, capacity, batch_priority
  ).items():
    out[t] += gate * expert_fns[expert](x[t])
  return out


def random_gates(rng, g, s, e):
  # Distinct values: no ties in top-k.
  logits = rng.permutation(g * s * e).reshape(g, s, e) / (g * s * e) * 6
  return np.asarray(jax.nn.softmax(jnp.asarray(logits)))


@pytest.mark.parametrize('name', ['einsum', 'indices'])
@pytest.mark.parametrize('batch_priority', [False, True])
@pytest.mark.parametrize('k,capacity', [(1, 3), (2, 4), (2, 2), (3, 16)])
def test_dispatch_combine_matches_loop(name, batch_priority, k, capacity):
  rng = np.random.default_rng(k * 10 + capacity)
  g, s, e, d = 3, 10, 4, 5
  gates = random_gates(rng, g, s, e)
  x = rng.normal(size=(g, s, d)).astype(np.float32)
  weights = rng.normal(size=(e, d, d)).astype(np.float32)
  dispatcher, metrics = moe.make_top_k_dispatcher(
    jnp.asarray(gates), k, name=name, capacity=capacity,
    batch_priority=batch_priority,
  )  # fmt: skip
  buffers = dispatcher.dispatch(jnp.asarray(x))  # (G, E, C, D)
  assert buffers.shape == (g, e, capacity, d)
  outputs = jnp.einsum('GECD,EDF->GECF', buffers, weights)
  y = dispatcher.combine(outputs)
  fns = [lambda v, w=w: v @ w for w in weights]
  for group in range(g):
    ref = loop_moe(x[group], gates[group], k, capacity, batch_priority, fns)
    np.testing.assert_allclose(y[group], ref, rtol=1e-4, atol=1e-5)
    kept = loop_top_k_routing(gates[group], k, capacity, batch_priority)
    # Buffers hold exactly the kept tokens in their slots; the rest is 0.
    expected_buffers = np.zeros((e, capacity, d), np.float32)
    for (t, expert), (slot, _) in kept.items():
      expected_buffers[expert, slot] = x[group, t]
    np.testing.assert_allclose(buffers[group], expected_buffers, atol=1e-6)
    assert float(metrics['dropped_fraction'][group]) == pytest.approx(
      1 - len(kept) / (s * k)
    )


def test_first_choices_before_second_and_drops():
  # 4 tokens all prefer expert 0, second choice expert 1; capacity 2.
  gates = jnp.array(
    [[[0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.8, 0.15, 0.05]]]
  )
  _, expert, slot = jax.vmap(
    lambda gt: moe.top_experts_per_item(gt, 2, batch_priority=False)
  )(gates)
  # Expert 0 slots: tokens 0, 1 (2, 3 dropped); expert 1 receives all four
  # second choices in token order.
  np.testing.assert_array_equal(expert[0], [[0, 1]] * 4)
  np.testing.assert_array_equal(slot[0], [[0, 0], [1, 1], [2, 2], [3, 3]])
  _, _, slot_bpr = jax.vmap(
    lambda gt: moe.top_experts_per_item(gt, 2, batch_priority=True)
  )(gates)
  # BPR order by top gate: tokens 3, 1, 0, 2.
  np.testing.assert_array_equal(slot_bpr[0][:, 0], [2, 1, 3, 0])
  dispatcher, metrics = moe.make_top_k_dispatcher(
    gates, 2, name='indices', capacity=2, batch_priority=False
  )
  # Tokens 2 and 3 lose their first choice and token 2, 3 their second
  # (expert 1 full after tokens 0, 1).
  assert float(metrics['dropped_fraction'][0]) == pytest.approx(4 / 8)
  assert float(metrics['dropped_tokens'][0]) == pytest.approx(2 / 4)
  y = dispatcher.combine(dispatcher.dispatch(jnp.ones((1, 4, 1))))
  np.testing.assert_allclose(y[0, :, 0], [0.9, 0.9, 0.0, 0.0], rtol=1e-6)


def test_compute_capacity_rounding_and_errors():
  # ceil(2 * 130 * 1.25 / 4) = 82 -> multiple of 4 -> 84.
  assert moe.compute_capacity(260, 4, 1.25) == 84
  assert moe.compute_capacity(260, 4, 1.25, multiple_of=None) == 82
  assert moe.compute_capacity(10, 4, 1.0, 'round', None) == 2
  with pytest.raises(ValueError, match='capacity_factor=-1'):
    moe.compute_capacity(10, 4, -1)
  with pytest.raises(ValueError, match="'floor'"):
    moe.compute_capacity(10, 4, 1.0, 'floor')
  with pytest.raises(ValueError, match='exactly one'):
    moe.make_top_k_dispatcher(jnp.ones((1, 4, 2)) / 2, 1)


def test_expert_choice_takes_top_tokens_per_expert():
  rng = np.random.default_rng(3)
  gates = random_gates(rng, 2, 8, 4)
  dispatcher, metrics = moe.make_top_items_per_expert_dispatcher(
    jnp.asarray(gates), capacity=3
  )
  x = rng.normal(size=(2, 8, 2)).astype(np.float32)
  buffers = dispatcher.dispatch(jnp.asarray(x))
  y = dispatcher.combine(buffers)  # identity experts
  for group in range(2):
    ref = np.zeros((8, 2))
    taken = np.zeros(8)
    for expert in range(4):
      top = np.argsort(-gates[group, :, expert], kind='stable')[:3]
      np.testing.assert_allclose(buffers[group, expert], x[group, top])
      for t in top:
        ref[t] += gates[group, t, expert] * x[group, t]
        taken[t] += 1
    np.testing.assert_allclose(y[group], ref, rtol=1e-5, atol=1e-6)
    assert float(metrics['dropped_tokens'][group]) == pytest.approx(
      np.mean(taken == 0)
    )


def _plain_moe_forward(dispatcher_name, group_size):
  """Reference layer: softmax router, top-2, experts on (E, G * C, D).

  The layout vmoe's vmapped MlpBlock runs its experts in; written out by
  hand so that the model's wiring (moe.sparse_moe, vit_moe.expert_mlp) is
  measured against it.
  """

  def forward(params, x):
    groups = x.reshape(-1, group_size, x.shape[-1])
    gates = jax.nn.softmax(groups @ params['Router']['dense']['kernel'])
    dispatcher, _ = moe.make_top_k_dispatcher(
      gates, 2, name=dispatcher_name, capacity_factor=1.25
    )
    buffers = dispatcher.dispatch(groups)  # (G, E, C, D)
    num_groups, _, capacity, dim = buffers.shape
    h = jnp.swapaxes(buffers, 0, 1).reshape(buffers.shape[1], -1, dim)
    mlp = params['Mlp']
    h = jnp.einsum('end,edf->enf', h, mlp['Dense_0']['kernel'])
    h = jax.nn.gelu(h + mlp['Dense_0']['bias'][:, None])
    h = jnp.einsum('enf,efd->end', h, mlp['Dense_1']['kernel'])
    h = h + mlp['Dense_1']['bias'][:, None]
    out = jnp.swapaxes(h.reshape(-1, num_groups, capacity, dim), 0, 1)
    return dispatcher.combine(out)

  return forward


@pytest.mark.parametrize('name', ['einsum', 'indices'])
def test_moe_layer_forward_memory_at_most_plain_experts(name):
  """The model's MoE layer needs no more forward temporary memory than the
  same dispatcher with hand-written (E, G * C, D) experts.

  XLA's memory_analysis is exact, so this needs no timing. With the experts
  as a 5-D (E, J, G, C, D) einsum, XLA:CPU gave the first dense layer and
  its GELU separate buffers and inserted layout copies: at the benchmark's
  size (benchmarks/moe_dispatch.py) 120 MiB against vmoe's 75, and 1.15x
  its time. Here the hidden (E, G * C, F) buffer is 10 MiB (20 MiB against
  11 before the fix).
  """
  group_size, dim, mlp_dim = 256, 64, 512
  x = jax.random.normal(
    jax.random.key(0), (2048 // group_size, group_size, dim)
  )
  router = dict(
    num_selected_experts=2, noise_std=1.0,
    dispatcher=dict(name=name, capacity_factor=1.25),
  )  # fmt: skip
  layer = models.MlpMoeBlock(
    mlp_dim=mlp_dim, num_experts=4, group_size=group_size, router=router
  )
  rngs = {'params': jax.random.key(1), 'gating': jax.random.key(2)}
  params = jax.jit(layer.init)(rngs, x)['params']

  def model_forward(params, x):
    return layer.apply({'params': params}, x, rngs={'gating': rngs['gating']})

  def temp_mib(fn):
    compiled = jax.jit(fn).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20

  plain = temp_mib(_plain_moe_forward(name, group_size))
  # 0.5 MiB of slack for the router's noise and auxiliary losses, against a
  # 10 MiB hidden buffer that a layout copy would duplicate.
  model = temp_mib(model_forward)
  assert model <= plain + 0.5, (model, plain)
