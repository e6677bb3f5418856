"""Sparse MoE dispatch/combine and the expert-parallel exchange.

Shape glossary, used across the package:
  B batch (images), V views, P patches per image, T tokens per image (P, plus
  one with a class token), D hidden, G groups, S group size (tokens), E
  experts, C capacity (buffer slots per expert and group), K experts per
  token.

All tokens of a batch are cut into G routing groups of S tokens, and each
group is routed independently ([V-MoE] Sec. 2.2, Riquelme et al. 2021,
arXiv:2106.05974). A dispatcher moves each group's tokens into per-expert
buffers, (G, S, D) -> (G, E, C, D), and combines the experts' outputs back,
(G, E, C, D') -> (G, S, D'), weighting each by its gate. Tokens that do not
fit in an expert's buffer are dropped: their MoE output is zero and the
residual connection carries them.

Expert parallelism (`sparse_moe`): under an active mesh with axes ('data',
'expert'), data major (sharding.make_mesh: device (d, j) is row d, column
j), the layer runs in `jax.shard_map`. The G groups are sharded over both
axes, data major: device (d, j) holds groups (d * J + j) * G_loc ... + G_loc
- 1, J the size of the 'expert' axis. Each device routes only its own
groups (top-k, capacity, priorities and auxiliary losses are per group, so
nothing global is needed), fills (G_loc, E, C, D) buffers and splits E into
(J, E / J): chunk j goes to device j of its own row with ONE all_to_all over
'expert', so the exchange never crosses 'data' (on 8-GPU nodes with the
expert axis inside a node it stays on NVLink). The received (J, G_loc, E/J,
C, D) buffers are laid out per local expert as (E/J, J, G_loc, C, D), the
experts run, and a second all_to_all returns the outputs. The expert
parameters enter with spec P('expert'); their gradients are summed over
'data' by shard_map's transpose. Without such a mesh the same function runs
with J = 1, so one device and every mesh compute the same numbers:
randomness is drawn outside the per-device code with global shapes (router
noise) or from global (expert, group) indices (expert dropout).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from einops import rearrange
from jax.sharding import PartitionSpec

from vmoe_jsd import sharding

Array = jax.Array


def compute_capacity(
  num_tokens: int,
  num_experts: int,
  capacity_factor: float,
  ceil_or_round: str = 'ceil',
  multiple_of: int | None = 4,
) -> int:
  """Buffer slots per expert: ceil(num_tokens * cf / E), up to a multiple.

  For top-K routing num_tokens = K * S, so C = ceil(K S cf / E) rounded up
  to a multiple of `multiple_of` (4 in vmoe, to avoid padding on TPUs).

  Args:
    num_tokens: tokens (times K) to distribute in one group.
    num_experts: E.
    capacity_factor: cf > 0.
    ceil_or_round: 'ceil' or 'round' the fractional capacity.
    multiple_of: round the capacity up to a multiple of this; None or 0: no.

  Returns:
    The capacity C >= 1.
  """
  if capacity_factor <= 0:
    raise ValueError(f'capacity_factor={capacity_factor} must be > 0')
  exact = num_tokens * capacity_factor / num_experts
  if ceil_or_round == 'ceil':
    capacity = int(math.ceil(exact))
  elif ceil_or_round == 'round':
    capacity = int(round(exact))
  else:
    raise ValueError(
      f"capacity_ceil_or_round={ceil_or_round!r} is unknown; choose 'ceil' "
      "or 'round'"
    )
  if capacity < 1:
    raise ValueError(
      f'num_tokens={num_tokens}, num_experts={num_experts} and '
      f'capacity_factor={capacity_factor} give capacity {capacity}; it must '
      'be >= 1'
    )
  if multiple_of:
    capacity += (-capacity) % multiple_of
  return capacity


# ----------------------------------------------------------------------------
# Dispatchers. Each holds the routing decision of every group.
# ----------------------------------------------------------------------------
def _maybe_bfloat16(x: Array, enabled: bool) -> Array:
  if enabled and jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.bfloat16)
  return x


@flax.struct.dataclass
class EinsumDispatcher:
  """Dispatch and combine with dense (G, S, E, C) weight tensors.

  The most general form: any routing (top-K, expert choice, soft slots of
  Soft MoE) is a dispatch tensor and a combine tensor. Cost grows with
  G * S * E * C, so prefer `IndicesDispatcher` for large top-K groups.

  Attributes:
    dispatch_weights: (G, S, E, C) weight of token s in slot c of expert e
      (0/1 for hard routing, soft for Soft MoE).
    combine_weights: (G, S, E, C) weight of that slot's output in token s's
      combined output.
    bfloat16: round the data to bfloat16 before dispatch and combine (to
      halve what crosses devices); the weights keep their dtype and the
      result is cast back, as vmoe's Bfloat16Dispatcher.
    precision: jax.lax.Precision of both einsums (vmoe's einsum_precision).
  """

  dispatch_weights: Array
  combine_weights: Array
  bfloat16: bool = flax.struct.field(pytree_node=False, default=False)
  precision: Any = flax.struct.field(pytree_node=False, default=None)

  def _einsum(self, spec: str, weights: Array, data: Array) -> Array:
    rounded = _maybe_bfloat16(data, self.bfloat16)
    out = jnp.einsum(spec, weights, rounded, precision=self.precision)
    return out.astype(data.dtype)

  def dispatch(self, data: Array) -> Array:
    """(G, S, ...) -> (G, E, C, ...)."""
    return self._einsum('GSEC,GS...->GEC...', self.dispatch_weights, data)

  def combine(self, data: Array) -> Array:
    """(G, E, C, ...) -> (G, S, ...)."""
    return self._einsum('GSEC,GEC...->GS...', self.combine_weights, data)


def _take_rows(x: Array, index: Array) -> Array:
  """x[index] with zero rows where index == len(x) (a dropped choice)."""
  return x.at[index].get(mode='fill', fill_value=0)


@flax.struct.dataclass
class IndicesDispatcher:
  """Dispatch and combine top-K routing by gathering rows.

  Memory and time grow with G * (S * K + E * C) * D, independent of the
  product S * E * C that the einsum form materialises.

  Attributes:
    expert_index: (G, S, K) int32 expert of each of a token's K choices.
    buffer_index: (G, S, K) int32 slot in that expert's buffer; >= capacity
      means the choice was dropped.
    combine_weights: (G, S, K) gate of each choice, 0 where dropped.
    num_experts: E.
    capacity: C.
    bfloat16: send data through dispatch/combine in bfloat16.
  """

  expert_index: Array
  buffer_index: Array
  combine_weights: Array
  num_experts: int = flax.struct.field(pytree_node=False)
  capacity: int = flax.struct.field(pytree_node=False)
  bfloat16: bool = flax.struct.field(pytree_node=False, default=False)

  def _slot_ids(self) -> Array:
    """(G, S, K) flat slot e * C + c of each choice; E * C when dropped."""
    kept = self.buffer_index < self.capacity
    slot = self.expert_index * self.capacity + self.buffer_index
    return jnp.where(kept, slot, self.num_experts * self.capacity)

  def dispatch(self, data: Array) -> Array:
    """(G, S, ...) -> (G, E, C, ...)."""
    num_groups, group_size = data.shape[:2]
    num_slots = self.num_experts * self.capacity
    slot = self._slot_ids().reshape(num_groups, -1)  # (G, S*K)
    token = jnp.broadcast_to(
      jnp.arange(group_size, dtype=jnp.int32)[:, None],
      self.expert_index.shape[1:],
    ).reshape(-1)
    # Which token fills each slot (S = none: _take_rows gives a zero row, and
    # its transpose drops the row's gradient, so no padded copy of the data
    # exists, forward or backward). A dropped choice writes to the extra
    # slot num_slots, cut off below.
    slot_token = jax.vmap(
      lambda s: (
        jnp.full((num_slots + 1,), group_size, jnp.int32).at[s].set(token)
      )
    )(slot)[:, :num_slots]
    dtype = data.dtype
    data = _maybe_bfloat16(data, self.bfloat16)
    out = jax.vmap(_take_rows)(data, slot_token)
    return out.reshape(
      num_groups, self.num_experts, self.capacity, *data.shape[2:]
    ).astype(dtype)

  def combine(self, data: Array) -> Array:
    """(G, E, C, ...) -> (G, S, ...)."""
    num_groups = data.shape[0]
    item_shape = data.shape[3:]
    dtype = data.dtype
    data = _maybe_bfloat16(data, self.bfloat16)
    flat = data.reshape(num_groups, -1, *item_shape)
    gathered = jax.vmap(_take_rows)(flat, self._slot_ids())
    weights = self.combine_weights
    weights = weights.reshape(weights.shape + (1,) * len(item_shape))
    return jnp.sum(gathered * weights, axis=2).astype(dtype)


# ----------------------------------------------------------------------------
# Top-K routing decisions (one group; vmap over groups).
# ----------------------------------------------------------------------------
def top_experts_per_item(
  gates: Array, num_selected_experts: int, batch_priority: bool
) -> tuple[Array, Array, Array]:
  """Top-K expert choice per token and each choice's position in the buffer.

  All first choices are served before any second choice, and so on. Within
  one rank, tokens earlier in the group come first ('vanilla' routing), or,
  with batch_priority, tokens whose largest gate is larger come first (Batch
  Prioritized Routing, [V-MoE] Sec. 4.1; ties keep the original order).

  Args:
    gates: (S, E) gate values (router softmax) of one group.
    num_selected_experts: K.
    batch_priority: use BPR order instead of the token order.

  Returns:
    (gate (S, K), expert_index (S, K) int32, buffer_index (S, K) int32): the
    K largest gates per token in decreasing order, their experts, and the
    0-based slot each choice takes in its expert's buffer when buffers are
    unbounded; compare with the capacity to find dropped choices.
  """
  group_size, num_experts = gates.shape
  top_gate, expert_index = jax.lax.top_k(gates, num_selected_experts)
  expert_index = expert_index.astype(jnp.int32)
  if batch_priority:
    order = jnp.argsort(-top_gate[:, 0], stable=True)
  else:
    order = jnp.arange(group_size)
  # (K * S,) choices in priority order: rank-major, then token priority.
  ranked = expert_index[order].T.reshape(-1)
  one_hot = jax.nn.one_hot(ranked, num_experts, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
  position = position.reshape(num_selected_experts, group_size).T  # (S, K)
  buffer_index = jnp.zeros_like(position).at[order].set(position)
  return top_gate, expert_index, buffer_index.astype(jnp.int32)


def make_top_k_dispatcher(
  gates: Array,
  num_selected_experts: int,
  *,
  name: str = 'einsum',
  capacity: int | None = None,
  capacity_factor: float | None = None,
  batch_priority: bool = False,
  capacity_ceil_or_round: str = 'ceil',
  capacity_multiple_of: int | None = 4,
  bfloat16: bool = False,
  einsum_precision: Any = None,
) -> tuple[EinsumDispatcher | IndicesDispatcher, dict[str, Array]]:
  """Builds the dispatcher of top-K (experts choose per token) routing.

  Args:
    gates: (G, S, E) gate values; also the combine weights of kept choices.
    num_selected_experts: K.
    name: 'einsum' or 'indices' (see the dispatcher classes).
    capacity: slots per expert and group; exclusive with capacity_factor.
    capacity_factor: C = ceil(K * S * cf / E) rounded up to a multiple of
      capacity_multiple_of.
    batch_priority: Batch Prioritized Routing.
    capacity_ceil_or_round: see compute_capacity.
    capacity_multiple_of: see compute_capacity.
    bfloat16: dispatch/combine data in bfloat16.
    einsum_precision: precision of the einsum dispatcher's einsums.

  Returns:
    The dispatcher and metrics: 'dropped_fraction' (G,), the fraction of the
    group's K * S choices that did not fit, and 'dropped_tokens' (G,), the
    fraction of tokens that lost every choice.
  """
  _, group_size, num_experts = gates.shape
  capacity = _group_capacity(
    capacity,
    capacity_factor,
    group_size * num_selected_experts,
    num_experts,
    capacity_ceil_or_round,
    capacity_multiple_of,
  )
  top_gate, expert_index, buffer_index = jax.vmap(
    lambda g: top_experts_per_item(g, num_selected_experts, batch_priority)
  )(gates)
  kept = buffer_index < capacity
  combine = jnp.where(kept, top_gate, 0.0)
  metrics = {
    'dropped_fraction': jnp.mean(~kept, axis=(1, 2)),
    'dropped_tokens': jnp.mean(~jnp.any(kept, axis=2), axis=1),
  }
  if name == 'indices':
    dispatcher = IndicesDispatcher(
      expert_index, buffer_index, combine, num_experts, capacity, bfloat16
    )
  elif name == 'einsum':
    weights = _top_k_einsum_weights(gates, expert_index, buffer_index, capacity)
    dispatcher = EinsumDispatcher(*weights, bfloat16, einsum_precision)
  else:
    raise ValueError(
      f"dispatcher.name={name!r} is unknown; choose one of ['einsum', "
      "'indices']"
    )
  return dispatcher, metrics


def _group_capacity(
  capacity, capacity_factor, num_tokens, num_experts, ceil_or_round, multiple_of
) -> int:
  """`capacity`, or the one `capacity_factor` gives (see compute_capacity)."""
  if (capacity is None) == (capacity_factor is None):
    raise ValueError(
      'Set exactly one of dispatcher.capacity and dispatcher.capacity_factor;'
      f' got capacity={capacity!r}, capacity_factor={capacity_factor!r}'
    )
  if capacity is None:
    capacity = compute_capacity(
      num_tokens, num_experts, capacity_factor, ceil_or_round, multiple_of
    )
  return capacity


def _top_k_einsum_weights(
  gates, expert_index, buffer_index, capacity: int
) -> tuple[Array, Array]:
  """(G, S, E, C) bool dispatch and combine weights of top-K choices.

  A token picks an expert at most once: its slot in each expert's buffer is
  one (G, S, E) int (-1 where not picked; >= C where dropped), whose boolean
  one-hot (G, S, E, C) XLA fuses into the dispatch einsum, as vmoe does. The
  combine weights pick the (G, S, E) gates with that one-hot (a kept
  choice's gate is exactly the value top_k returned). Summing the K choices'
  gates first, as before, made XLA materialise a float (G, S, E, C)
  reduction ahead of the combine einsum (at S=1024: 2570 MiB accessed per
  forward + backward against vmoe's 2327; now 2326).
  """
  num_experts = gates.shape[-1]
  picked = expert_index[..., None] == jnp.arange(num_experts)  # (G,S,K,E)
  slot = jnp.max(jnp.where(picked, buffer_index[..., None], -1), axis=2)
  dispatch = jax.nn.one_hot(slot, capacity, dtype=jnp.bool_)
  combine = jnp.where(dispatch, gates[..., None], jnp.zeros((), gates.dtype))
  return dispatch, combine


def make_top_items_per_expert_dispatcher(
  gates: Array,
  *,
  capacity: int | None = None,
  capacity_factor: float | None = None,
  capacity_ceil_or_round: str = 'ceil',
  capacity_multiple_of: int | None = 4,
  bfloat16: bool = False,
  name: str = 'einsum',
  einsum_precision: Any = None,
) -> tuple[EinsumDispatcher, dict[str, Array]]:
  """Expert-choice routing: every expert takes its top-C tokens.

  Zhou et al., "Mixture-of-Experts with Expert Choice Routing",
  arXiv:2202.09368. Loads are balanced by construction; a token may be taken
  by 0..E experts. C = ceil(S * cf / E), rounded up as in compute_capacity.

  Args:
    gates: (G, S, E) gate values; also the combine weights.
    capacity, capacity_factor, capacity_ceil_or_round, capacity_multiple_of:
      as in make_top_k_dispatcher, with num_tokens = S.
    bfloat16: dispatch/combine data in bfloat16.
    name: only 'einsum' is implemented for this routing.

  Returns:
    The dispatcher and metrics: 'dropped_tokens' (G,) the fraction of tokens
    no expert took, 'experts_per_token' (G,) the mean number of experts that
    took a token.
  """
  if name != 'einsum':
    raise ValueError(
      f'dispatcher.name={name!r} is not available for expert-choice routing;'
      " choose 'einsum'"
    )
  _, group_size, num_experts = gates.shape
  capacity = _group_capacity(
    capacity,
    capacity_factor,
    group_size,
    num_experts,
    capacity_ceil_or_round,
    capacity_multiple_of,
  )
  if capacity > group_size:
    raise ValueError(
      f'expert-choice capacity {capacity} exceeds the group size '
      f'{group_size}; lower capacity_factor'
    )
  # (G, E, C) the C tokens with the largest gate, per expert.
  _, token_index = jax.lax.top_k(jnp.swapaxes(gates, 1, 2), capacity)
  dispatch = jax.nn.one_hot(token_index, group_size, axis=1, dtype=jnp.bool_)
  combine = dispatch * gates[..., None]
  experts_per_token = jnp.sum(dispatch, axis=(2, 3), dtype=jnp.int32)
  metrics = {
    'dropped_tokens': jnp.mean(experts_per_token == 0, axis=1),
    'experts_per_token': jnp.mean(experts_per_token, axis=1),
  }
  dispatcher = EinsumDispatcher(dispatch, combine, bfloat16, einsum_precision)
  return dispatcher, metrics


# ----------------------------------------------------------------------------
# Expert-parallel MoE layer.
# ----------------------------------------------------------------------------
def dropout_keys(key: Array, expert_ids: Array, group_ids: Array) -> Array:
  """One key per (global expert, global group): (E_loc,) x (J, G) -> keys.

  Expert dropout masks are drawn from fold_in(fold_in(key, expert), group),
  so a token's mask depends on where it is routed, never on which device
  holds it or on the mesh shape.

  Returns:
    (E_loc, J, G_loc) keys.
  """
  return jax.vmap(
    lambda e: jax.vmap(jax.vmap(lambda g: jax.random.fold_in(e, g)))(group_ids)
  )(jax.vmap(lambda e: jax.random.fold_in(key, e))(expert_ids))


def _exchange(x: Array, wire_dtype) -> Array:
  """all_to_all over 'expert' of axis 0 (J chunks), in wire_dtype if set."""
  dtype = x.dtype
  if wire_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
    x = x.astype(wire_dtype)
  x = jax.lax.all_to_all(x, sharding.EXPERT_AXIS, 0, 0, tiled=True)
  return x.astype(dtype)


def _local_moe(
  x,
  routing_arrays,
  expert_params,
  dropout_key,
  *,
  route_fn,
  expert_fn,
  num_experts: int,
  num_expert_shards: int,
  axes: bool,
):
  """One device's part of the MoE layer (or all of it without a mesh).

  Shapes (J = expert-axis size, E_loc = E / J, G_loc = local groups):
    x (G_loc, S, D) -> dispatch (G_loc, E, C, D) -> all_to_all over 'expert'
    -> (E_loc, J, G_loc, C, D) -> experts -> all_to_all back -> combine
    (G_loc, S, D).
  """
  dispatcher, metrics = route_fn(routing_arrays)
  buffers = dispatcher.dispatch(x)  # (G_loc, E, C, D)
  num_groups = x.shape[0]
  j = num_expert_shards
  if axes:
    data_index = jax.lax.axis_index(sharding.DATA_AXIS)
    expert_index = jax.lax.axis_index(sharding.EXPERT_AXIS)
  else:
    data_index = expert_index = 0
  # Chunk j of the expert axis goes to device j of this device's expert
  # group (same 'data' coordinate); it sends back in the same order.
  send = rearrange(buffers, 'g (j e) c d -> j g e c d', j=j)
  # A bfloat16 dispatcher already rounded the buffers (and rounds what
  # combine receives) to bfloat16: sending them as bfloat16 halves the
  # exchanged bytes and changes no value, forward or backward.
  wire = jnp.bfloat16 if getattr(dispatcher, 'bfloat16', False) else None
  if axes and j > 1:
    send = _exchange(send, wire)
  # Axis j now names the SENDER: its local groups are the global groups
  # (data_index * J + j) * G_loc + g (groups are sharded data-major).
  inputs = rearrange(send, 'j g e c d -> e j g c d')  # (E_loc, J, G_loc, C, D)
  keys = None
  if dropout_key is not None:
    num_local = num_experts // j
    expert_ids = expert_index * num_local + jnp.arange(num_local)
    group_ids = (data_index * j + jnp.arange(j))[:, None] * num_groups
    group_ids = group_ids + jnp.arange(num_groups)[None, :]
    keys = dropout_keys(dropout_key, expert_ids, group_ids)
  outputs = expert_fn(expert_params, inputs, keys)  # (E_loc, J, G_loc, C, D')
  back = rearrange(outputs, 'e j g c d -> j g e c d')
  if axes and j > 1:
    back = _exchange(back, wire)
  back = rearrange(back, 'j g e c d -> g (j e) c d')  # (G_loc, E, C, D')
  return dispatcher.combine(back), metrics


def sparse_moe(
  x: Array,
  routing_arrays: Mapping[str, Array],
  expert_params: Any,
  dropout_key: Array | None,
  *,
  route_fn: Callable,
  expert_fn: Callable,
  num_experts: int,
) -> tuple[Array, dict[str, Array]]:
  """The MoE layer: route, dispatch, experts, combine; expert-parallel in
  `jax.shard_map` under an active ('data', 'expert') mesh (jax.set_mesh; the
  module docstring says how), on all groups at once (J = 1) without one.

  Args:
    x: (G, S, D) tokens.
    routing_arrays: per-group (G, ...) arrays from a router called with
      split=True (logits, noisy logits).
    expert_params: pytree of expert parameters stacked on axis 0 (E, ...).
    dropout_key: key of the experts' dropout, or None (no dropout).
    route_fn: pure arrays -> (dispatcher, metrics of shape (G,)).
    expert_fn: pure (params (E_loc, ...), inputs (E_loc, J, G, C, D), keys
      (E_loc, J, G) or None) -> (E_loc, J, G, C, D').
    num_experts: E.

  Returns:
    (G, S, D') outputs and per-group metrics (G,) (their mean over groups is
    vmoe's, whatever the mesh).
  """
  mesh = sharding.expert_parallel_mesh()
  num_shards = 1 if mesh is None else mesh.shape[sharding.EXPERT_AXIS]
  body = functools.partial(
    _local_moe,
    route_fn=route_fn,
    expert_fn=expert_fn,
    num_experts=num_experts,
    num_expert_shards=num_shards,
    axes=mesh is not None,
  )
  args = (x, dict(routing_arrays), expert_params, dropout_key)
  if mesh is None:
    return body(*args)
  num_devices = num_shards * mesh.shape[sharding.DATA_AXIS]
  if num_experts % num_shards:
    raise ValueError(
      f'num_experts={num_experts} is not divisible by the mesh expert axis '
      f'size {num_shards} (num_expert_partitions)'
    )
  if x.shape[0] % num_devices:
    raise ValueError(
      f'{x.shape[0]} routing groups cannot be split evenly over the '
      f'{num_devices} devices of mesh {dict(mesh.shape)}; the tokens per '
      'device must be a multiple of group_size'
    )
  batch = PartitionSpec(sharding.BATCH_AXES)
  experts = PartitionSpec(sharding.EXPERT_AXIS)
  in_specs = (batch, batch, experts, PartitionSpec())
  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(batch,) * 2)
  return fn(*args)
