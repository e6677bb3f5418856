"""Routers: from a group of tokens to a dispatcher, metrics and router logits.

Every router computes its gating logits with a bias-free dense layer named
'dense' (the parameter `.../Moe/Router/dense/kernel`, as in vmoe), and sows
the CLEAN logits (before noise, before top-k) into the 'intermediates'
collection under the name 'router_logits', shape (G, S, E). The train step
and evaluation read them from there (apply with mutable=['intermediates'])
for the router-consistency loss and the routing figures, so no module
signature carries correspondence arguments. Soft MoE sows its dispatch
logits (token-slot affinities), its analogue of a router distribution.

Routers ([V-MoE] = Riquelme et al. 2021, arXiv:2106.05974):
  - NoisyTopExpertsPerItemRouter: top-K experts per token, Gaussian noise of
    std noise_std / E on the logits during training ([V-MoE] Sec. 2.2 and
    Appendix A), vanilla or Batch Prioritized Routing, capacity.
  - NoisyTopItemsPerExpertRouter: expert choice (arXiv:2202.09368).
Each returns (dispatcher, metrics); metrics values have shape (G,) and
include 'auxiliary_loss', the weighted sum of the router's auxiliary losses.

Every router is split in two (call with split=True): a flax part that owns
the parameters, draws the noise with the GLOBAL (G, S, E) shape and sows the
logits, and a pure `route` function of those arrays that handles each group
on its own (softmax, top-k, capacity, priorities, auxiliary losses, all in
float32). The MoE layer runs `route` under shard_map on each device's local
groups (moe.sparse_moe); since the noise was drawn before the split, the
result does not depend on the device mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe_jsd import losses
from vmoe_jsd.config_errors import lookup
from vmoe_jsd.models import moe

Array = jax.Array
KwArgs = Mapping[str, Any]

ROUTER_LOGITS = 'router_logits'


def _weighted_sum(*pairs):
  """Sum of weight * value over pairs with weight > 0 (others may be NaN)."""
  terms = [w * v for w, v in pairs if w > 0]
  return sum(terms) if terms else 0.0


def _dispatcher_kwargs(dispatcher: KwArgs | None) -> dict[str, Any]:
  kwargs = dict(dispatcher or {})
  # Sharding hint of vmoe's configs: this package shards groups over the
  # mesh itself (see moe.sparse_moe), so the hint carries no information.
  kwargs.pop('partition_spec', None)
  return kwargs


def _gating_arrays(router: nn.Module, inputs: Array):
  """The router's clean logits (sown), and noisy ones during training.

  Creates the bias-free dense layer 'dense' inside `router` (call from its
  compact __call__). The noise std is router.noise_std / E, vmoe's unit.

  Returns:
    ({'logits': (G, S, E), 'noisy_logits': the same plus noise, absent
    when deterministic or noise_std = 0}, the noise std used).
  """
  logits = nn.Dense(
    router.num_experts,
    use_bias=False,
    dtype=router.dtype or inputs.dtype,
    name='dense',
  )(inputs)
  router.sow('intermediates', ROUTER_LOGITS, logits)
  if router.deterministic or router.noise_std == 0.0:
    return {'logits': logits}, 0.0
  noise_std = router.noise_std / router.num_experts
  noisy = logits + noise_std * jax.random.normal(
    router.make_rng('gating'), logits.shape, logits.dtype
  )
  return {'logits': logits, 'noisy_logits': noisy}, noise_std


class _GatedRouter(nn.Module):
  """The fields of the routers with a dense gating layer (below).

  Attributes:
    num_experts: E.
    noise_std: noise std in units of 1 / E (vmoe's convention), training
      only.
    z_loss_weight: weight of the router z-loss.
    dispatcher: kwargs of the router's dispatcher (moe.py).
    deterministic: no noise (evaluation).
    dtype: dtype of the gating computation.
  """

  num_experts: int
  noise_std: float = 1.0
  z_loss_weight: float = 0.0
  dispatcher: KwArgs | None = None
  deterministic: bool = False
  dtype: Any = None


class NoisyTopExpertsPerItemRouter(_GatedRouter):
  """Noisy top-K router of V-MoE ([V-MoE] Sec. 2.2, Appendix A).

  Gates are softmax(W x) (clean) or softmax(W x + eps), eps ~ N(0, (noise_std
  / E)^2) during training; each token goes to its K largest gates, which are
  also its combine weights (not renormalised). Auxiliary losses per group:
  importance (clean gates), load (training only: it needs the noise), and
  optionally GShard's and the ST-MoE z-loss.

  Attributes (and _GatedRouter's; dispatcher: kwargs of
  moe.make_top_k_dispatcher):
    num_selected_experts: K, 1 <= K <= E.
    importance_loss_weight: weight of the importance loss.
    load_loss_weight: weight of the load loss.
    gshard_loss_weight: weight of GShard's l_aux.
  """

  num_selected_experts: int = 1
  importance_loss_weight: float = 1.0
  load_loss_weight: float = 1.0
  gshard_loss_weight: float = 0.0

  @nn.compact
  def __call__(self, inputs: Array, *, split: bool = False):
    """Routes (G, S, D) tokens; see the module docstring.

    Args:
      inputs: (G, S, D) groups of tokens.
      split: return the two parts of the module docstring, (arrays, route),
        instead of (dispatcher, metrics) = route(arrays); route treats every
        group on its own (any subset of groups, e.g. a device's).

    Returns:
      (dispatcher, metrics), or (arrays, route) when split.
    """
    if inputs.ndim != 3:
      raise ValueError(f'router inputs must be (G, S, D), got {inputs.shape}')
    if not 1 <= self.num_selected_experts <= self.num_experts:
      raise ValueError(
        f'num_selected_experts={self.num_selected_experts} must be in '
        f'[1, num_experts={self.num_experts}]'
      )
    arrays, noise_std = _gating_arrays(self, inputs)
    route = functools.partial(
      _route_top_k,
      noise_std=noise_std,
      num_selected_experts=self.num_selected_experts,
      weights=(
        self.importance_loss_weight,
        self.load_loss_weight,
        self.gshard_loss_weight,
        self.z_loss_weight,
      ),
      dispatcher_kwargs=_dispatcher_kwargs(self.dispatcher),
      dtype=inputs.dtype,
    )
    return (arrays, route) if split else route(arrays)


def _route_top_k(
  arrays, *, noise_std, num_selected_experts, weights, dispatcher_kwargs, dtype
):
  """Pure part of NoisyTopExpertsPerItemRouter (per group, float32 losses)."""
  logits = arrays['logits'].astype(jnp.float32)
  noisy_logits = arrays.get('noisy_logits')
  gates = jax.nn.softmax(logits)
  metrics = {'importance_loss': jax.vmap(losses.importance_loss)(gates)}
  if noisy_logits is None:
    gates_dispatch = gates
  else:
    noisy_logits = noisy_logits.astype(jnp.float32)
    gates_dispatch = jax.nn.softmax(noisy_logits)
    metrics['load_loss'] = jax.vmap(
      lambda a, b: losses.load_loss(a, b, noise_std, num_selected_experts)
    )(logits, noisy_logits)
  metrics['gshard_loss'] = jax.vmap(losses.gshard_loss)(gates_dispatch)
  metrics['z_loss'] = jax.vmap(losses.router_z_loss)(logits)
  importance_w, load_w, gshard_w, z_w = weights
  metrics['auxiliary_loss'] = _weighted_sum(
    (importance_w, metrics['importance_loss']),
    (load_w, metrics.get('load_loss', 0.0)),
    (gshard_w, metrics['gshard_loss']),
    (z_w, metrics['z_loss']),
  ) + jnp.zeros(logits.shape[0])
  dispatcher, dispatch_metrics = moe.make_top_k_dispatcher(
    gates_dispatch.astype(dtype), num_selected_experts, **dispatcher_kwargs
  )
  metrics.update(dispatch_metrics)
  return dispatcher, metrics


class NoisyTopItemsPerExpertRouter(_GatedRouter):
  """Expert-choice router (Zhou et al. 2022, arXiv:2202.09368).

  Each expert takes the C tokens with the largest gate; no auxiliary loss is
  needed for balance (its auxiliary_loss is the optional z-loss). Attributes:
  _GatedRouter's (dispatcher: kwargs of
  moe.make_top_items_per_expert_dispatcher).
  """

  @nn.compact
  def __call__(self, inputs: Array, *, split: bool = False):
    """As NoisyTopExpertsPerItemRouter.__call__."""
    arrays, _ = _gating_arrays(self, inputs)
    route = functools.partial(
      _route_expert_choice,
      z_loss_weight=self.z_loss_weight,
      dispatcher_kwargs=_dispatcher_kwargs(self.dispatcher),
      dtype=inputs.dtype,
    )
    return (arrays, route) if split else route(arrays)


def _route_expert_choice(arrays, *, z_loss_weight, dispatcher_kwargs, dtype):
  """Pure part of NoisyTopItemsPerExpertRouter (per group)."""
  logits = arrays['logits'].astype(jnp.float32)
  logits_dispatch = arrays.get('noisy_logits', logits).astype(jnp.float32)
  gates = jax.nn.softmax(logits_dispatch)
  dispatcher, metrics = moe.make_top_items_per_expert_dispatcher(
    gates.astype(dtype), **dispatcher_kwargs
  )
  metrics['z_loss'] = jax.vmap(losses.router_z_loss)(logits)
  metrics['auxiliary_loss'] = _weighted_sum(
    (z_loss_weight, metrics['z_loss'])
  ) + jnp.zeros(logits.shape[0])
  return dispatcher, metrics


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
  """x / sqrt(sum x^2 + eps) along `axis` (Soft MoE's normalisation)."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis, keepdims=True) + eps)


class SoftRouter(nn.Module):
  """Soft MoE router (Puigcerver et al., "From Sparse to Soft Mixtures of
  Experts", ICLR 2024, arXiv:2308.00951, Algorithm 1 with the normalisation
  of its Sec. 2.3).

  Every expert has `num_slots` slots; slot (e, p) has a learned vector
  mu[:, e, p]. With unit-norm tokens x and slot vectors, logits =
  scale * <x_m, mu_ep>; each slot's input is a convex combination of the
  group's tokens (dispatch = softmax over tokens), each token's output a
  convex combination of all slots' outputs (combine = softmax over slots).
  Parameters 'mu' (D, E, P) and 'scale' () as in vmoe's soft_moe project.

  What it sows as 'router_logits' (G, S, E): logsumexp over each expert's
  slots of the clean token-slot logits, so that softmax over experts is the
  share of each expert in the token's combine weights: Soft MoE's per-token
  distribution over experts, the analogue of a router softmax.
  (The dispatch weights are distributions over tokens, one per slot, and
  have no per-token form.)

  Attributes:
    num_experts: E.
    num_slots: slots per expert P; default round(S * capacity_factor / E).
    capacity_factor: used when num_slots is None.
    noise_std: Gaussian noise std on the logits during training.
    bfloat16: dispatch/combine data in bfloat16 (vmoe always does).
    deterministic: no noise.
    dtype: computation dtype.
    mu_init: initializer of mu.
    scale_init: initializer of scale.
    precision: precision of the logits and dispatch/combine einsums.
    partition_spec: vmoe's sharding hint; accepted and unused (this package
      shards groups itself, see moe.sparse_moe).
    compute_similarity_metrics: accepted for vmoe configs; the cosine
      similarity monitoring metrics of vmoe's soft_moe project are not
      computed.
  """

  num_experts: int
  num_slots: int | None = None
  capacity_factor: float | None = 1.0
  noise_std: float = 0.0
  bfloat16: bool = True
  deterministic: bool = False
  dtype: Any = None
  mu_init: Callable = nn.initializers.lecun_normal()
  scale_init: Callable = nn.initializers.ones
  precision: Any = None
  partition_spec: Any = None
  compute_similarity_metrics: bool = True

  @nn.compact
  def __call__(self, inputs: Array, *, split: bool = False):
    """As NoisyTopExpertsPerItemRouter.__call__; arrays hold the (noisy)
    (G, S, E, P) token-slot logits."""
    dtype = self.dtype or inputs.dtype
    x = l2_normalize(inputs.astype(dtype))
    _, group_size, dim = x.shape
    num_slots = self.num_slots or moe.compute_capacity(
      group_size, self.num_experts, self.capacity_factor, 'round', None
    )
    mu = self.param('mu', self.mu_init, (dim, self.num_experts, num_slots))
    mu = l2_normalize(mu.astype(dtype), axis=0)
    scale = self.param('scale', self.scale_init, ()).astype(dtype)
    # Scale the smaller operand (fewer multiplications), as vmoe does.
    if x.size < mu.size:
      x = x * scale
    else:
      mu = mu * scale
    logits = jnp.einsum('GSD,DEP->GSEP', x, mu, precision=self.precision)
    self.sow(
      'intermediates',
      ROUTER_LOGITS,
      jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1),
    )
    if not self.deterministic and self.noise_std > 0:
      logits = logits + self.noise_std * jax.random.normal(
        self.make_rng('gating'), logits.shape, logits.dtype
      )
    route = functools.partial(_route_soft, bfloat16=self.bfloat16)
    return ({'logits': logits}, route) if split else route({'logits': logits})


def _route_soft(arrays, *, bfloat16):
  """Pure part of SoftRouter: (G, S, E, P) logits -> dispatcher, metrics."""
  logits = arrays['logits']
  dispatch = jax.nn.softmax(logits, axis=1)
  combine = jax.nn.softmax(logits, axis=(2, 3))
  dispatcher = moe.EinsumDispatcher(
    dispatch_weights=dispatch,
    combine_weights=combine,
    bfloat16=bfloat16,
  )
  metrics = {
    'auxiliary_loss': jnp.zeros(logits.shape[0], jnp.float32),
    'combine_weights_max_mean': jnp.mean(jnp.max(combine, axis=(2, 3)), axis=1),
    'dispatch_weights_max_mean': jnp.mean(
      jnp.max(dispatch, axis=1), axis=(1, 2)
    ),
  }
  return dispatcher, metrics


ROUTERS = {
  'NoisyTopExpertsPerItemRouter': NoisyTopExpertsPerItemRouter,
  'NoisyTopItemsPerExpertRouter': NoisyTopItemsPerExpertRouter,
  'SoftRouter': SoftRouter,
}


def get_router_cls(name: str):
  return lookup(ROUTERS, 'router.name', name)
